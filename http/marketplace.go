package http

import (
	"cmp"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/distributedcompute/fleet"
)

// nodeView is a node as the REST API shows it: stored fields, live state and
// reliability. APIKeyPrefix is set only in the owner's views.
type nodeView struct {
	ID                string         `json:"id"`
	OwnerID           string         `json:"owner_id"`
	Name              string         `json:"name"`
	Region            string         `json:"region"`
	PricePerHourCents int64          `json:"price_per_hour_cents"`
	Specs             fleet.Specs    `json:"specs"`
	Status            string         `json:"status"`
	LastSeenAt        *time.Time     `json:"last_seen_at"`
	ConnectedSince    *time.Time     `json:"connected_since"`
	Metrics           *fleet.Metrics `json:"metrics"`
	Reliability       float64        `json:"reliability"`
	CreatedAt         time.Time      `json:"created_at"`
	UpdatedAt         time.Time      `json:"updated_at"`
	APIKeyPrefix      *string        `json:"api_key_prefix,omitempty"`
}

// view joins a stored node with its live state. Reliability is filled by
// withReliability, which costs a store read.
func (s *Server) view(n *fleet.Node, p fleet.Presence, private bool) *nodeView {
	v := &nodeView{
		ID: n.ID, OwnerID: n.OwnerID, Name: n.Name, Region: n.Region,
		PricePerHourCents: n.PricePerHourCents, Specs: n.Specs, Status: fleet.StatusOffline,
		LastSeenAt: n.LastSeenAt, CreatedAt: n.CreatedAt, UpdatedAt: n.UpdatedAt,
	}
	if p.Online {
		v.Status = fleet.StatusOnline
		if p.Rented {
			v.Status = fleet.StatusRented
		}
		v.LastSeenAt, v.ConnectedSince, v.Metrics = utc(p.LastSeenAt), utc(p.ConnectedSince), p.Metrics
	} else if !p.LastSeenAt.IsZero() && (v.LastSeenAt == nil || p.LastSeenAt.After(*v.LastSeenAt)) {
		v.LastSeenAt = utc(p.LastSeenAt)
	}
	if private {
		prefix := n.APIKeyPrefix
		v.APIKeyPrefix = &prefix
	}
	return v
}

func (s *Server) withReliability(c echo.Context, views ...*nodeView) error {
	now := s.cfg.Now()
	for _, v := range views {
		sessions, err := s.cfg.Sessions.Sessions(c.Request().Context(), v.ID, now.Add(-fleet.ReliabilityWindow))
		if err != nil {
			return err
		}
		v.Reliability = round3(fleet.Reliability(v.CreatedAt, sessions, now))
	}
	return nil
}

func round3(f float64) float64 { return float64(int64(f*1000+0.5)) / 1000 }

func utc(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

// nodeQuery is a parsed listing query.
type nodeQuery struct {
	status, gpuModel, region string
	minGPUs, minVRAM         int
	maxPrice                 int64
	sort                     string
	limit                    int
	after                    *cursor
}

// cursor is the opaque position after the last node of a page: the sort it
// belongs to, the sort key and the ID of that node.
type cursor struct {
	Sort string `json:"s"`
	Key  int64  `json:"k"`
	ID   string `json:"id"`
}

var sorts = map[string]func(v *nodeView) int64{
	"price":      func(v *nodeView) int64 { return v.PricePerHourCents },
	"created_at": func(v *nodeView) int64 { return v.CreatedAt.UnixNano() },
	"gpu_count":  func(v *nodeView) int64 { return int64(v.Specs.GPUCount) },
}

func (s *Server) parseNodeQuery(q url.Values) (nodeQuery, error) {
	var v fleet.ValidationError
	nq := nodeQuery{sort: "-created_at", limit: s.cfg.DefaultPageSize}
	nq.status = q.Get("status")
	switch nq.status {
	case "", fleet.StatusOnline, fleet.StatusOffline, fleet.StatusRented:
	default:
		v.Add("status", "must be online, offline or rented")
	}
	nq.gpuModel, nq.region = strings.TrimSpace(q.Get("gpu_model")), q.Get("region")
	intParam := func(name string, max int64) int64 {
		raw := q.Get(name)
		if raw == "" {
			return 0
		}
		n, err := strconv.ParseInt(raw, 10, 64)
		if err != nil || n < 0 || n > max {
			v.Add(name, "must be an integer between 0 and "+strconv.FormatInt(max, 10))
		}
		return n
	}
	nq.minGPUs = int(intParam("min_gpus", fleet.MaxGPUCount))
	nq.minVRAM = int(intParam("min_vram", fleet.MaxGPUVRAMGB))
	nq.maxPrice = intParam("max_price", fleet.MaxPricePerHourCents)
	if raw := q.Get("sort"); raw != "" {
		if _, ok := sorts[strings.TrimPrefix(raw, "-")]; !ok {
			v.Add("sort", "must be one of price, created_at, gpu_count, optionally prefixed with - for descending")
		}
		nq.sort = raw
	}
	if raw := q.Get("limit"); raw != "" {
		n, err := strconv.Atoi(raw)
		if err != nil || n < 1 || n > s.cfg.MaxPageSize {
			v.Add("limit", "must be an integer between 1 and "+strconv.Itoa(s.cfg.MaxPageSize))
		}
		nq.limit = n
	}
	if raw := q.Get("cursor"); raw != "" {
		var c cursor
		b, err := base64.RawURLEncoding.DecodeString(raw)
		if err == nil {
			err = json.Unmarshal(b, &c)
		}
		if err != nil || c.Sort != nq.sort || c.ID == "" {
			v.Add("cursor", "is not a cursor of this listing and sort")
		}
		nq.after = &c
	}
	return nq, v.Err()
}

func (nq *nodeQuery) match(v *nodeView) bool {
	return (nq.status == "" || v.Status == nq.status) &&
		(nq.gpuModel == "" || strings.EqualFold(v.Specs.GPUModel, nq.gpuModel)) &&
		(nq.region == "" || v.Region == nq.region) &&
		v.Specs.GPUCount >= nq.minGPUs &&
		(nq.minVRAM == 0 || (v.Specs.GPUCount > 0 && v.Specs.GPUVRAMGB >= nq.minVRAM)) &&
		(nq.maxPrice == 0 || v.PricePerHourCents <= nq.maxPrice)
}

// listNodes is the public listing: filter, sort by a key with the ID as tie
// breaker, and page with a keyset cursor so that pages stay stable while
// nodes come and go.
func (s *Server) listNodes(c echo.Context) error {
	nq, err := s.parseNodeQuery(c.QueryParams())
	if err != nil {
		return err
	}
	nodes, err := s.cfg.Nodes.Nodes(c.Request().Context())
	if err != nil {
		return err
	}
	online := s.cfg.Fleet.Online()
	views := make([]*nodeView, 0, len(nodes))
	for _, n := range nodes {
		if v := s.view(n, online[n.ID], false); nq.match(v) {
			views = append(views, v)
		}
	}
	keyOf, desc := sorts[strings.TrimPrefix(nq.sort, "-")], strings.HasPrefix(nq.sort, "-")
	compare := func(ak int64, aid string, bk int64, bid string) int {
		r := cmp.Compare(ak, bk)
		if desc {
			r = -r
		}
		if r == 0 {
			r = strings.Compare(aid, bid)
		}
		return r
	}
	slices.SortFunc(views, func(a, b *nodeView) int { return compare(keyOf(a), a.ID, keyOf(b), b.ID) })
	if nq.after != nil {
		i, _ := slices.BinarySearchFunc(views, nq.after, func(v *nodeView, c *cursor) int {
			return compare(keyOf(v), v.ID, c.Key, c.ID)
		})
		for i < len(views) && compare(keyOf(views[i]), views[i].ID, nq.after.Key, nq.after.ID) <= 0 {
			i++
		}
		views = views[i:]
	}
	meta := map[string]any{"limit": nq.limit, "next_cursor": nil}
	if len(views) > nq.limit {
		views = views[:nq.limit]
		last := views[len(views)-1]
		b, _ := json.Marshal(cursor{Sort: nq.sort, Key: keyOf(last), ID: last.ID})
		meta["next_cursor"] = base64.RawURLEncoding.EncodeToString(b)
	}
	if err := s.withReliability(c, views...); err != nil {
		return err
	}
	return okList(c, views, meta)
}

func (s *Server) getNode(c echo.Context) error {
	n, err := s.cfg.Nodes.Node(c.Request().Context(), c.Param("id"))
	if err != nil {
		return err
	}
	v := s.view(n, s.cfg.Fleet.Presence(n.ID), false)
	if err := s.withReliability(c, v); err != nil {
		return err
	}
	return ok(c, http.StatusOK, v)
}

type modelStats struct {
	GPUs       int `json:"gpus"`
	OnlineGPUs int `json:"online_gpus"`
	Nodes      int `json:"nodes"`
}

func (s *Server) stats(c echo.Context) error {
	nodes, err := s.cfg.Nodes.Nodes(c.Request().Context())
	if err != nil {
		return err
	}
	online := s.cfg.Fleet.Online()
	var total, on, rented, gpus, onlineGPUs int
	byModel := map[string]*modelStats{}
	prices := make([]int64, 0, len(nodes))
	for _, n := range nodes {
		v := s.view(n, online[n.ID], false)
		total++
		prices = append(prices, n.PricePerHourCents)
		gpus += n.Specs.GPUCount
		live := v.Status != fleet.StatusOffline
		if live {
			on++
			onlineGPUs += n.Specs.GPUCount
		}
		if v.Status == fleet.StatusRented {
			rented++
		}
		if n.Specs.GPUCount > 0 {
			m := byModel[n.Specs.GPUModel]
			if m == nil {
				m = &modelStats{}
				byModel[n.Specs.GPUModel] = m
			}
			m.Nodes++
			m.GPUs += n.Specs.GPUCount
			if live {
				m.OnlineGPUs += n.Specs.GPUCount
			}
		}
	}
	price := map[string]*int64{"min": nil, "median": nil, "max": nil}
	if len(prices) > 0 {
		slices.Sort(prices)
		med := prices[len(prices)/2]
		if len(prices)%2 == 0 {
			med = (prices[len(prices)/2-1] + prices[len(prices)/2]) / 2
		}
		price["min"], price["median"], price["max"] = &prices[0], &med, &prices[len(prices)-1]
	}
	return ok(c, http.StatusOK, map[string]any{
		"total_nodes":          total,
		"online_nodes":         on,
		"available_nodes":      on - rented,
		"rented_nodes":         rented,
		"offline_nodes":        total - on,
		"total_gpus":           gpus,
		"online_gpus":          onlineGPUs,
		"gpus_by_model":        byModel,
		"price_per_hour_cents": price,
	})
}

// keyAnswer is what registration and rotation return: the key, shown once.
type keyAnswer struct {
	Node   *nodeView `json:"node"`
	APIKey string    `json:"api_key"`
}

func (s *Server) createNode(c echo.Context) error {
	var in fleet.NodeInput
	if err := bind(c, &in); err != nil {
		return err
	}
	if err := in.Validate(true); err != nil {
		return err
	}
	now := s.cfg.Now().UTC()
	n := &fleet.Node{ID: fleet.NewID("node_"), OwnerID: userID(c), CreatedAt: now, UpdatedAt: now}
	in.Apply(n)
	key := fleet.NewAPIKey()
	n.APIKeyPrefix = key.Prefix
	if err := s.cfg.Nodes.CreateNode(c.Request().Context(), n, key.Hash); err != nil {
		return err
	}
	s.log.Info("node registered", "node_id", n.ID, "user_id", n.OwnerID, "request_id", requestID(c))
	c.Response().Header().Set(echo.HeaderCacheControl, "no-store")
	c.Response().Header().Set(echo.HeaderLocation, "/api/marketplace/nodes/"+n.ID)
	return ok(c, http.StatusCreated, keyAnswer{Node: s.view(n, fleet.Presence{}, true), APIKey: key.Raw})
}

// ownedNode loads a node the caller must own: 404 if it does not exist, 403
// if it is someone else's.
func (s *Server) ownedNode(c echo.Context) (*fleet.Node, error) {
	n, err := s.cfg.Nodes.Node(c.Request().Context(), c.Param("id"))
	if err != nil {
		return nil, err
	}
	if n.OwnerID != userID(c) {
		return nil, errForbidden
	}
	return n, nil
}

var errForbidden = fleet.Errorf(fleet.EFORBIDDEN, "You do not own this node.")

func (s *Server) updateNode(c echo.Context) error {
	if _, err := s.ownedNode(c); err != nil {
		return err
	}
	var in fleet.NodeInput
	if err := bind(c, &in); err != nil {
		return err
	}
	if err := in.Validate(false); err != nil {
		return err
	}
	user, now := userID(c), s.cfg.Now().UTC()
	n, err := s.cfg.Nodes.UpdateNode(c.Request().Context(), c.Param("id"), func(n *fleet.Node) error {
		if n.OwnerID != user {
			return errForbidden
		}
		in.Apply(n)
		n.UpdatedAt = now
		return nil
	})
	if err != nil {
		return err
	}
	v := s.view(n, s.cfg.Fleet.Presence(n.ID), true)
	if err := s.withReliability(c, v); err != nil {
		return err
	}
	return ok(c, http.StatusOK, v)
}

func (s *Server) deleteNode(c echo.Context) error {
	n, err := s.ownedNode(c)
	if err != nil {
		return err
	}
	if s.cfg.Billing != nil {
		// Billing checks for a live rental and deletes in one step, so no
		// rental can start in between.
		err = s.cfg.Billing.DeleteNode(c.Request().Context(), userID(c), n.ID)
	} else if err = s.cfg.Nodes.DeleteNode(c.Request().Context(), n.ID); err == nil {
		s.cfg.Fleet.Disconnect(n.ID, fleet.CloseKeyRevoked)
	}
	if err != nil {
		return err
	}
	s.log.Info("node deleted", "node_id", n.ID, "user_id", n.OwnerID, "request_id", requestID(c))
	return ok(c, http.StatusOK, map[string]any{"id": n.ID, "deleted": true})
}

func (s *Server) myNodes(c echo.Context) error {
	nodes, err := s.cfg.Nodes.NodesByOwner(c.Request().Context(), userID(c))
	if err != nil {
		return err
	}
	views := make([]*nodeView, len(nodes))
	for i, n := range nodes {
		views[i] = s.view(n, s.cfg.Fleet.Presence(n.ID), true)
	}
	if err := s.withReliability(c, views...); err != nil {
		return err
	}
	return okList(c, views, map[string]any{"count": len(views)})
}

func (s *Server) rotateKey(c echo.Context) error {
	if _, err := s.ownedNode(c); err != nil {
		return err
	}
	key := fleet.NewAPIKey()
	n, err := s.cfg.Nodes.SetAPIKey(c.Request().Context(), c.Param("id"), key.Hash, key.Prefix)
	if err != nil {
		return err
	}
	s.cfg.Fleet.Disconnect(n.ID, fleet.CloseKeyRevoked)
	s.log.Info("host API key rotated", "node_id", n.ID, "request_id", requestID(c))
	c.Response().Header().Set(echo.HeaderCacheControl, "no-store")
	return ok(c, http.StatusOK, keyAnswer{Node: s.view(n, s.cfg.Fleet.Presence(n.ID), true), APIKey: key.Raw})
}

func (s *Server) revokeKey(c echo.Context) error {
	if _, err := s.ownedNode(c); err != nil {
		return err
	}
	n, err := s.cfg.Nodes.SetAPIKey(c.Request().Context(), c.Param("id"), nil, "")
	if err != nil {
		return err
	}
	s.cfg.Fleet.Disconnect(n.ID, fleet.CloseKeyRevoked)
	s.log.Info("host API key revoked", "node_id", n.ID, "request_id", requestID(c))
	return ok(c, http.StatusOK, s.view(n, s.cfg.Fleet.Presence(n.ID), true))
}
