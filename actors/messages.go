package actors

import (
	"time"

	"github.com/asynkron/protoactor-go/actor"

	"github.com/distributedcompute/fleet"
)

// Messages between the actors of one coordinator. They never cross a process
// boundary, so they are plain Go values.

// accept hands a freshly authenticated connection to the fleet supervisor.
type accept struct {
	node    *fleet.Node
	keyHash []byte
	conn    fleet.Conn
}

// kick asks the fleet to close a node's connection with code.
type kick struct {
	nodeID string
	code   int
}

// kickAll closes every connection with code; the shutdown path.
type kickAll struct{ code int }

// inbound is a frame the reader goroutine read; readFailed ends the reader.
type inbound struct{ frame fleet.Frame }

// inboundRaw is a frame read but not yet decoded.
type inboundRaw []byte
type readFailed struct{ err error }
type writeFailed struct{ err error }

// deadlineTick is sent by the node actor's own timer; the actor decides.
type deadlineTick struct{}

// reportPresence asks a node actor to tell the registry its state again,
// after the registry restarted.
type reportPresence struct{}

// rebuild is sent by a (re)started registry to the fleet, which asks every
// node actor to report.
type rebuild struct{}

// nodeUp and nodeDown are what node actors tell the registry; heartbeats
// in between update the view directly.
type nodeUp struct {
	nodeID         string
	pid            *actor.PID
	connectedSince time.Time
	lastSeen       time.Time
	metrics        *fleet.Metrics
}

type nodeDown struct {
	nodeID   string
	pid      *actor.PID
	lastSeen time.Time
}

// checkpoint makes the registry write the last-seen times of online nodes.
type checkpoint struct{}

// panicNow makes an actor panic; tests use it to exercise supervision.
type panicNow struct{}
