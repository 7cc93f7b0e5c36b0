// Package http serves the coordinator's REST API and agent endpoints with Echo.
package http

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/http/socketio"
)

var requestDuration = promauto.NewHistogramVec(prometheus.HistogramOpts{
	Name:    "fleet_http_request_duration_seconds",
	Help:    "REST request latency by route.",
	Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
}, []string{"method", "route"})

// nethttpClient is used for calls to Clerk; it must never hang a request.
var nethttpClient = http.Client{Timeout: 10 * time.Second}

// Config is what the server needs; cmd/coordinator fills it from settings.
type Config struct {
	Nodes    fleet.NodeStore
	Sessions fleet.SessionStore
	// Fleet is the live view; nil shows every node offline.
	Fleet Fleet
	// Billing and Rentals serve /api/billing; the coordinator always sets
	// them (tests of the marketplace alone may not).
	Billing  Billing
	Rentals  fleet.RentalStore
	Verifier *Verifier
	Logger   *slog.Logger

	MaxBodyBytes     int64   // 1 MiB
	MaxPageSize      int     // 200
	DefaultPageSize  int     // 50
	RateLimitRPS     float64 // per user on authenticated routes, per IP on public ones
	RateLimitBurst   int
	RateLimitMaxKeys int // buckets kept in memory
	MaxFrameBytes    int // agent frames (64 KiB)
	// SocketIOPingInterval is Engine.IO's ping interval; it must not exceed
	// the heartbeat deadline (4 s).
	SocketIOPingInterval time.Duration
	WriteTimeoutWS       time.Duration // per agent frame written (10 s)
	CORSAllowedOrigins   []string
	// TrustedProxies are the networks whose X-Forwarded-For is believed.
	TrustedProxies    []*net.IPNet
	ReadHeaderTimeout time.Duration
	ReadTimeout       time.Duration
	WriteTimeout      time.Duration
	IdleTimeout       time.Duration

	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Fleet is the live view of connected nodes, as the REST layer needs it.
type Fleet interface {
	// Presence returns the live state of one node.
	Presence(nodeID string) fleet.Presence
	// Online returns the live state of every connected node.
	Online() map[string]fleet.Presence
	// Disconnect closes the node's live socket, if any, with code.
	Disconnect(nodeID string, code int)
	// Connect hands an authenticated agent connection to the fleet.
	Connect(n *fleet.Node, keyHash []byte, c fleet.Conn)
}

type offlineFleet struct{}

func (offlineFleet) Presence(string) fleet.Presence    { return fleet.Presence{} }
func (offlineFleet) Online() map[string]fleet.Presence { return nil }
func (offlineFleet) Disconnect(string, int)            {}
func (offlineFleet) Connect(_ *fleet.Node, _ []byte, c fleet.Conn) {
	_ = c.Close(fleet.CloseGoingAway, "no fleet")
}

// Server is the coordinator's HTTP server.
type Server struct {
	cfg     Config
	log     *slog.Logger
	echo    *echo.Echo
	http    *http.Server
	closing atomic.Bool
	// authFailures limits refused tokens per client IP, so that a flood of
	// bad tokens costs its sender, not our CPU.
	authFailures *limiter
	openapi      map[string]any
	sio          *socketio.Server
}

// NewServer builds the server and its routes.
func NewServer(cfg Config) *Server {
	if cfg.Fleet == nil {
		cfg.Fleet = offlineFleet{}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	setDefault(&cfg.MaxBodyBytes, 1<<20)
	setDefault(&cfg.MaxPageSize, 200)
	setDefault(&cfg.DefaultPageSize, 50)
	setDefault(&cfg.RateLimitRPS, 20)
	setDefault(&cfg.RateLimitBurst, 40)
	setDefault(&cfg.RateLimitMaxKeys, 100_000)
	setDefault(&cfg.MaxFrameBytes, 64<<10)
	setDefault(&cfg.SocketIOPingInterval, 4*time.Second)
	setDefault(&cfg.WriteTimeoutWS, 10*time.Second)
	setDefault(&cfg.ReadHeaderTimeout, 5*time.Second)
	setDefault(&cfg.ReadTimeout, 15*time.Second)
	setDefault(&cfg.WriteTimeout, 30*time.Second)
	setDefault(&cfg.IdleTimeout, 120*time.Second)

	s := &Server{cfg: cfg, log: cfg.Logger, openapi: openAPIDocument(),
		authFailures: newLimiter("auth-failures", cfg.RateLimitRPS, cfg.RateLimitBurst, cfg.RateLimitMaxKeys)}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = s.handleError
	// The client's address is the peer's, unless the peer is a proxy the
	// operator trusts: an untrusted X-Forwarded-For would let anyone pick
	// their own rate-limit bucket.
	e.IPExtractor = echo.ExtractIPDirect()
	if len(cfg.TrustedProxies) > 0 {
		opts := []echo.TrustOption{echo.TrustLoopback(false), echo.TrustLinkLocal(false), echo.TrustPrivateNet(false)}
		for _, n := range cfg.TrustedProxies {
			opts = append(opts, echo.TrustIPRange(n))
		}
		e.IPExtractor = echo.ExtractIPFromXFFHeader(opts...)
	}
	s.echo = e

	e.Use(s.requestID, s.accessLog, s.recoverPanic)
	// Without configured origins there is no CORS at all: browsers on other
	// origins are refused, which is the default the design asks for.
	if len(cfg.CORSAllowedOrigins) > 0 {
		e.Use(middleware.CORSWithConfig(middleware.CORSConfig{
			AllowOrigins:  cfg.CORSAllowedOrigins,
			AllowMethods:  []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete},
			AllowHeaders:  []string{echo.HeaderAuthorization, echo.HeaderContentType, "Idempotency-Key"},
			ExposeHeaders: []string{"RateLimit", "RateLimit-Policy", "Retry-After", echo.HeaderXRequestID, echo.HeaderLocation, "Idempotent-Replayed"},
			MaxAge:        600,
		}))
	}
	e.Use(s.limitBody)

	s.sio = socketio.NewServer(socketio.Config{
		Namespace:    "/fleet",
		PingInterval: cfg.SocketIOPingInterval,
		MaxFrameSize: cfg.MaxFrameBytes,
		WriteTimeout: cfg.WriteTimeoutWS,
		Logger:       cfg.Logger.With("transport", "socket.io"),
	}, s.socketIOConnect)
	s.routes()
	s.http = &http.Server{
		Handler:           e,
		ReadHeaderTimeout: cfg.ReadHeaderTimeout,
		ReadTimeout:       cfg.ReadTimeout,
		WriteTimeout:      cfg.WriteTimeout,
		IdleTimeout:       cfg.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
	}
	return s
}

func (s *Server) routes() {
	e := s.echo
	public := newLimiter("per-ip", s.cfg.RateLimitRPS, s.cfg.RateLimitBurst, s.cfg.RateLimitMaxKeys).
		middleware(func(c echo.Context) string { return "ip:" + ipBucket(c.RealIP()) })
	perUser := newLimiter("per-user", s.cfg.RateLimitRPS, s.cfg.RateLimitBurst, s.cfg.RateLimitMaxKeys).
		middleware(func(c echo.Context) string { return "user:" + userID(c) })
	auth := []echo.MiddlewareFunc{s.authenticate, perUser}

	e.GET("/healthz", s.healthz)
	e.GET("/metrics", echo.WrapHandler(promhttp.Handler()))
	e.GET("/fleet", s.fleetSocket)
	// Socket.IO's client polls and upgrades under /socket.io/; the namespace
	// /fleet is inside its packets.
	e.Match([]string{http.MethodGet, http.MethodPost}, "/socket.io/", echo.WrapHandler(s.sio))
	e.GET("/readyz", s.readyz)
	e.GET("/api/openapi.json", s.openAPI, public)

	m := e.Group("/api/marketplace")
	m.GET("/nodes", s.listNodes, public)
	m.GET("/nodes/:id", s.getNode, public)
	m.GET("/stats", s.stats, public)
	m.POST("/nodes", s.createNode, auth...)
	m.PUT("/nodes/:id", s.updateNode, auth...)
	m.DELETE("/nodes/:id", s.deleteNode, auth...)
	m.GET("/my-nodes", s.myNodes, auth...)
	m.POST("/nodes/:id/api-key", s.rotateKey, auth...)
	m.DELETE("/nodes/:id/api-key", s.revokeKey, auth...)

	// Middleware per route, not per group: a group's catch-all would turn
	// a wrong method into 404 instead of 405.
	b := e.Group("/api/billing")
	b.POST("/rentals", s.createRental, auth...)
	b.GET("/rentals", s.listRentals, auth...)
	b.GET("/rentals/:id", s.getRental, auth...)
	b.POST("/rentals/:id/stop", s.stopRental, auth...)
	b.GET("/earnings", s.earnings, auth...)
	b.GET("/summary", s.summary, auth...)
}

// Echo exposes the router so that other packages can mount endpoints.
func (s *Server) Echo() *echo.Echo { return s.echo }

// Serve serves on l until Shutdown; TLS when certFile and keyFile are set.
func (s *Server) Serve(l net.Listener, certFile, keyFile string) error {
	var err error
	if certFile != "" {
		err = s.http.ServeTLS(l, certFile, keyFile)
	} else {
		err = s.http.Serve(l)
	}
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// StopAccepting makes /readyz fail and refuses new agent connections, the
// first step of a graceful shutdown.
func (s *Server) StopAccepting() { s.closing.Store(true) }

// Shutdown marks the server not ready, then stops accepting and waits for
// requests in flight until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	s.closing.Store(true)
	err := s.http.Shutdown(ctx)
	s.sio.Close()
	return err
}

func (s *Server) healthz(c echo.Context) error {
	return ok(c, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *Server) readyz(c echo.Context) error {
	if s.closing.Load() {
		return c.JSON(http.StatusServiceUnavailable, envelope{Error: &errorBody{Code: "UNAVAILABLE", Message: "Shutting down."}})
	}
	if _, err := s.cfg.Nodes.Node(c.Request().Context(), "readyz-probe"); err != nil && fleet.ErrorCode(err) != fleet.ENOTFOUND {
		s.log.Error("readiness probe failed", "error", err)
		return c.JSON(http.StatusServiceUnavailable, envelope{Error: &errorBody{Code: "UNAVAILABLE", Message: "Store unavailable."}})
	}
	return ok(c, http.StatusOK, map[string]string{"status": "ready"})
}

const ctxRequestID = "request_id"

// requestID gives every request a fresh ID. A client-sent X-Request-ID is
// not trusted: it would let callers forge log correlation.
func (s *Server) requestID(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		var b [8]byte
		_, _ = rand.Read(b[:])
		id := hex.EncodeToString(b[:])
		c.Set(ctxRequestID, id)
		c.Response().Header().Set(echo.HeaderXRequestID, id)
		return next(c)
	}
}

func requestID(c echo.Context) string {
	id, _ := c.Get(ctxRequestID).(string)
	return id
}

// accessLog writes one line per request. It never logs headers or bodies,
// so tokens and keys stay out of the logs.
func (s *Server) accessLog(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		start := time.Now()
		err := next(c)
		if err != nil {
			c.Error(err)
		}
		req := c.Request()
		route := c.Path()
		if route == "" {
			route = "unmatched" // bounded label values: never the raw path
		}
		requestDuration.WithLabelValues(req.Method, route).Observe(time.Since(start).Seconds())
		level := slog.LevelInfo
		if route == "/socket.io/" {
			level = slog.LevelDebug // long-polling would drown the log
		}
		s.log.LogAttrs(req.Context(), level, "request",
			slog.String("request_id", requestID(c)),
			slog.String("method", req.Method),
			slog.String("route", c.Path()),
			slog.Int("status", c.Response().Status),
			slog.Duration("duration", time.Since(start)),
			slog.String("remote", c.RealIP()),
			slog.String("user_id", userID(c)),
		)
		return nil
	}
}

// recoverPanic turns a handler panic into a 500; nothing panics the process.
func (s *Server) recoverPanic(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) (err error) {
		defer func() {
			if r := recover(); r != nil {
				if r == http.ErrAbortHandler {
					panic(r)
				}
				s.log.Error("handler panic", "request_id", requestID(c), "panic", r)
				err = errors.New("handler panic")
			}
		}()
		return next(c)
	}
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// limitBody refuses bodies over MaxBodyBytes: at once when Content-Length
// says so, else when reading passes the limit (bind reports it as 413).
func (s *Server) limitBody(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		req := c.Request()
		if req.ContentLength > s.cfg.MaxBodyBytes {
			return fleet.Errorf(fleet.ETOOLARGE, "Request body too large; the limit is %d bytes.", s.cfg.MaxBodyBytes)
		}
		req.Body = http.MaxBytesReader(c.Response(), req.Body, s.cfg.MaxBodyBytes)
		return next(c)
	}
}

// ipBucket is the rate-limit key of a client address: the address itself
// for IPv4, its /64 for IPv6, where one host commonly holds a whole /64.
func ipBucket(addr string) string {
	ip := net.ParseIP(addr)
	if ip == nil || ip.To4() != nil {
		return addr
	}
	return ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
}
