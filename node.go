package fleet

import (
	"context"
	"regexp"
	"strings"
	"time"
	"unicode/utf8"
)

// Node statuses as shown by the REST API. Status is derived from the live
// view and the rentals; it is never stored or set by a client.
const (
	StatusOffline = "offline"
	StatusOnline  = "online"
	StatusRented  = "rented"
)

// Validation limits of a node's editable fields.
const (
	MaxNodeNameLen       = 100
	MaxRegionLen         = 64
	MaxGPUModelLen       = 64
	MaxGPUCount          = 64
	MaxGPUVRAMGB         = 1024
	MaxCPUCores          = 4096
	MaxRAMGB             = 1 << 20
	MaxDiskGB            = 1 << 24
	MaxPricePerHourCents = 100_000_00 // $100,000 an hour
)

var regionPattern = regexp.MustCompile(`^[a-z0-9]+(-[a-z0-9]+)*$`)

// Specs is the hardware a host declares for a node.
type Specs struct {
	GPUModel  string `json:"gpu_model"`
	GPUCount  int    `json:"gpu_count"`
	GPUVRAMGB int    `json:"gpu_vram_gb"` // per GPU
	CPUCores  int    `json:"cpu_cores"`
	RAMGB     int    `json:"ram_gb"`
	DiskGB    int    `json:"disk_gb"`
}

// Node is a machine a host lists on the marketplace. The owner creates and
// edits it through the REST API; the store owns its persisted form.
type Node struct {
	ID                string `json:"id"`
	OwnerID           string `json:"owner_id"`
	Name              string `json:"name"`
	Region            string `json:"region"`
	PricePerHourCents int64  `json:"price_per_hour_cents"`
	Specs             Specs  `json:"specs"`
	// APIKeyPrefix is the first characters of the current host API key, so
	// that an owner can tell keys apart; empty when the key is revoked.
	APIKeyPrefix string    `json:"api_key_prefix"`
	CreatedAt    time.Time `json:"created_at"`
	UpdatedAt    time.Time `json:"updated_at"`
	// LastSeenAt is the time of the last heartbeat recorded on disconnect.
	LastSeenAt *time.Time `json:"last_seen_at,omitempty"`
}

// NodeInput is the editable part of a node, as a client sends it. Nil fields
// are left unchanged by an update and are required on creation.
type NodeInput struct {
	Name              *string `json:"name"`
	Region            *string `json:"region"`
	PricePerHourCents *int64  `json:"price_per_hour_cents"`
	Specs             *Specs  `json:"specs"`
}

// Validate checks the fields present in in; with create set, every field is
// required.
func (in *NodeInput) Validate(create bool) error {
	var v ValidationError
	if in.Name == nil {
		if create {
			v.Add("name", "is required")
		}
	} else if n := strings.TrimSpace(*in.Name); n == "" {
		v.Add("name", "must not be empty")
	} else if utf8.RuneCountInString(n) > MaxNodeNameLen {
		v.Add("name", "must be at most 100 characters")
	} else if !utf8.ValidString(n) || strings.ContainsFunc(n, isControl) {
		v.Add("name", "must be printable text")
	}
	if in.Region == nil {
		if create {
			v.Add("region", "is required")
		}
	} else if len(*in.Region) > MaxRegionLen || !regionPattern.MatchString(*in.Region) {
		v.Add("region", "must be lowercase letters, digits and dashes, at most 64 characters (e.g. us-east-1)")
	}
	if in.PricePerHourCents == nil {
		if create {
			v.Add("price_per_hour_cents", "is required")
		}
	} else if p := *in.PricePerHourCents; p < 1 || p > MaxPricePerHourCents {
		v.Add("price_per_hour_cents", "must be between 1 and 10000000")
	}
	if in.Specs == nil {
		if create {
			v.Add("specs", "is required")
		}
	} else {
		s := in.Specs
		switch {
		case s.GPUCount < 0 || s.GPUCount > MaxGPUCount:
			v.Add("specs.gpu_count", "must be between 0 and 64")
		case s.GPUCount > 0 && strings.TrimSpace(s.GPUModel) == "":
			v.Add("specs.gpu_model", "is required when gpu_count is above 0")
		case s.GPUCount > 0 && (s.GPUVRAMGB < 1 || s.GPUVRAMGB > MaxGPUVRAMGB):
			v.Add("specs.gpu_vram_gb", "must be between 1 and 1024 when gpu_count is above 0")
		}
		if len(s.GPUModel) > MaxGPUModelLen || strings.ContainsFunc(s.GPUModel, isControl) {
			v.Add("specs.gpu_model", "must be printable text of at most 64 characters")
		}
		if s.GPUVRAMGB < 0 || s.GPUVRAMGB > MaxGPUVRAMGB {
			v.Add("specs.gpu_vram_gb", "must be between 0 and 1024")
		}
		if s.CPUCores < 1 || s.CPUCores > MaxCPUCores {
			v.Add("specs.cpu_cores", "must be between 1 and 4096")
		}
		if s.RAMGB < 1 || s.RAMGB > MaxRAMGB {
			v.Add("specs.ram_gb", "must be between 1 and 1048576")
		}
		if s.DiskGB < 0 || s.DiskGB > MaxDiskGB {
			v.Add("specs.disk_gb", "must be between 0 and 16777216")
		}
	}
	return v.Err()
}

// Apply copies the fields present in in onto n.
func (in *NodeInput) Apply(n *Node) {
	if in.Name != nil {
		n.Name = strings.TrimSpace(*in.Name)
	}
	if in.Region != nil {
		n.Region = *in.Region
	}
	if in.PricePerHourCents != nil {
		n.PricePerHourCents = *in.PricePerHourCents
	}
	if in.Specs != nil {
		n.Specs = *in.Specs
		n.Specs.GPUModel = strings.TrimSpace(n.Specs.GPUModel)
		if n.Specs.GPUCount == 0 {
			n.Specs.GPUModel, n.Specs.GPUVRAMGB = "", 0
		}
	}
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

// NodeStore persists nodes and the index from host API key hash to node.
// Implementations return ENOTFOUND errors for missing nodes.
type NodeStore interface {
	// CreateNode stores a new node with the hash of its first API key.
	CreateNode(ctx context.Context, n *Node, keyHash []byte) error
	// Node returns one node.
	Node(ctx context.Context, id string) (*Node, error)
	// Nodes returns every node, ordered by ID.
	Nodes(ctx context.Context) ([]*Node, error)
	// NodesByOwner returns the nodes of one owner, ordered by ID.
	NodesByOwner(ctx context.Context, ownerID string) ([]*Node, error)
	// UpdateNode applies fn to the stored node atomically and stores the result.
	UpdateNode(ctx context.Context, id string, fn func(*Node) error) (*Node, error)
	// DeleteNode removes a node, its key hash and its sessions.
	DeleteNode(ctx context.Context, id string) error
	// SetAPIKey replaces the node's key hash and prefix; a nil hash revokes
	// the key without replacement.
	SetAPIKey(ctx context.Context, id string, keyHash []byte, prefix string) (*Node, error)
	// NodeByKeyHash returns the node whose current key has this hash.
	NodeByKeyHash(ctx context.Context, keyHash []byte) (*Node, error)
}
