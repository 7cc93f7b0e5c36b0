package socketio

import (
	"log/slog"
	"time"
)

// Defaults of Config.
const (
	DefaultNamespace      = "/fleet"
	DefaultPingInterval   = 4 * time.Second
	DefaultPingTimeout    = 5 * time.Second
	DefaultMaxPayload     = 128 << 10
	DefaultMaxFrameSize   = 64 << 10
	DefaultWriteTimeout   = 10 * time.Second
	DefaultQueueSize      = 64
	DefaultMaxSessions    = 100000
	DefaultUpgradeTimeout = 10 * time.Second
)

// Limits that are not settings.
const (
	// connectTimeout closes an Engine.IO session that has not connected to
	// the namespace, as the reference server's connectTimeout (45 s) does,
	// so that unauthenticated sessions cannot be held open for free.
	connectTimeout = 45 * time.Second
	// refuseCloseDelay is how long after refusing a connect (CONNECT then
	// DISCONNECT) the server closes the Engine.IO session itself. The real
	// client closes it first; the delay keeps the Engine.IO close out of the
	// payload that carries the DISCONNECT.
	refuseCloseDelay = 500 * time.Millisecond
)

// Config holds the settings of a Server. Zero fields take the defaults above.
type Config struct {
	// Namespace is the one Socket.IO namespace served; connects to any other
	// get CONNECT_ERROR "Invalid namespace".
	Namespace string
	// PingInterval is how often the server pings each session. The caller
	// keeps it at or below the heartbeat deadline.
	PingInterval time.Duration
	// PingTimeout is how long the client has to answer a ping.
	PingTimeout time.Duration
	// MaxPayload is the largest polling POST body or WebSocket message
	// accepted, in bytes; advertised to the client as maxPayload. Bigger
	// closes the session.
	MaxPayload int
	// MaxFrameSize is the largest Socket.IO event packet accepted, in bytes.
	// A bigger one is dropped and reported by ReadFrame as fleet.ErrBadFrame.
	MaxFrameSize int
	// WriteTimeout bounds each write to the network.
	WriteTimeout time.Duration
	// QueueSize is how many outbound packets a session buffers; a session
	// whose queue overflows is closed (slow consumer). It also sizes the
	// inbound buffer of a Conn.
	QueueSize int
	// MaxSessions caps live Engine.IO sessions; handshakes beyond it are
	// refused with Engine.IO error code 4.
	MaxSessions int
	// UpgradeTimeout abandons a WebSocket upgrade that has not completed.
	UpgradeTimeout time.Duration
	// Logger receives debug logs of sessions; slog.Default() when nil.
	Logger *slog.Logger
}

// withDefaults returns c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.Namespace == "" {
		c.Namespace = DefaultNamespace
	}
	if c.PingInterval <= 0 {
		c.PingInterval = DefaultPingInterval
	}
	if c.PingTimeout <= 0 {
		c.PingTimeout = DefaultPingTimeout
	}
	if c.MaxPayload <= 0 {
		c.MaxPayload = DefaultMaxPayload
	}
	if c.MaxFrameSize <= 0 {
		c.MaxFrameSize = DefaultMaxFrameSize
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	if c.QueueSize <= 0 {
		c.QueueSize = DefaultQueueSize
	}
	if c.MaxSessions <= 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	if c.UpgradeTimeout <= 0 {
		c.UpgradeTimeout = DefaultUpgradeTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}
