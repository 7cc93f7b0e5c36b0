package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	fleethttp "github.com/distributedcompute/fleet/http"
)

// config is every setting of the coordinator, read from the environment
// (and a .env file) once at start-up.
type config struct {
	Port            int
	DataDir         string
	AuthMode        string // "clerk" or "dev"
	ClerkSecretKey  string
	ClerkIssuer     string
	ClerkAPIURL     string
	ClerkParties    []string
	CORSOrigins     []string
	TrustedProxies  []*net.IPNet
	RateLimitRPS    float64
	RateLimitBurst  int
	MaxBodyBytes    int64
	MaxPageSize     int
	TLSCertFile     string
	TLSKeyFile      string
	LogLevel        slog.Level
	LogFormat       string
	ShutdownTimeout time.Duration

	HeartbeatDeadline    time.Duration
	HeartbeatMinInterval time.Duration
	MaxFrameBytes        int
	LostAfter            time.Duration

	// Cluster mode (CLUSTER=etcd): several coordinators as one.
	Cluster              string
	EtcdEndpoints        []string
	ClusterName          string
	ClusterAdvertiseHost string
	ClusterPort          int
}

// settingError names the setting at fault, so that start-up fails with one
// clear line.
type settingError struct{ name, problem string }

func (e *settingError) Error() string { return e.name + " " + e.problem }

// env reads settings through getenv and remembers the first problem.
type env struct {
	getenv func(string) string
	err    error
}

func (e *env) fail(name, problem string) {
	if e.err == nil {
		e.err = &settingError{name, problem}
	}
}

func (e *env) str(name, def string) string {
	if v := strings.TrimSpace(e.getenv(name)); v != "" {
		return v
	}
	return def
}

func (e *env) integer(name string, def, min, max int64) int64 {
	raw := e.str(name, "")
	if raw == "" {
		return def
	}
	n, err := strconv.ParseInt(raw, 10, 64)
	if err != nil || n < min || n > max {
		e.fail(name, fmt.Sprintf("must be an integer from %d to %d, got %q", min, max, raw))
		return def
	}
	return n
}

func (e *env) number(name string, def, min, max float64) float64 {
	raw := e.str(name, "")
	if raw == "" {
		return def
	}
	n, err := strconv.ParseFloat(raw, 64)
	if err != nil || n < min || n > max {
		e.fail(name, fmt.Sprintf("must be a number from %g to %g, got %q", min, max, raw))
		return def
	}
	return n
}

func (e *env) duration(name string, def, min, max time.Duration) time.Duration {
	raw := e.str(name, "")
	if raw == "" {
		return def
	}
	d, err := time.ParseDuration(raw)
	if err != nil || d < min || d > max {
		e.fail(name, fmt.Sprintf("must be a duration from %s to %s (e.g. 5s), got %q", min, max, raw))
		return def
	}
	return d
}

func (e *env) list(name string) []string {
	var out []string
	for _, s := range strings.Split(e.str(name, ""), ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// loadConfig reads the settings. With serving set it also checks what only
// serve needs (Clerk keys in clerk mode, TLS pairs).
func loadConfig(getenv func(string) string, serving bool) (*config, error) {
	e := &env{getenv: getenv}
	c := &config{
		Port:            int(e.integer("PORT", 3000, 0, 65535)),
		DataDir:         e.str("DATA_DIR", "./data"),
		AuthMode:        e.str("AUTH_MODE", "clerk"),
		ClerkSecretKey:  e.str("CLERK_SECRET_KEY", ""),
		ClerkIssuer:     strings.TrimRight(e.str("CLERK_ISSUER", ""), "/"),
		ClerkAPIURL:     e.str("CLERK_API_URL", "https://api.clerk.com/v1"),
		ClerkParties:    e.list("CLERK_AUTHORIZED_PARTIES"),
		CORSOrigins:     e.list("CORS_ALLOWED_ORIGINS"),
		RateLimitRPS:    e.number("RATE_LIMIT_RPS", 20, 0.01, 1e6),
		RateLimitBurst:  int(e.integer("RATE_LIMIT_BURST", 40, 1, 1e6)),
		MaxBodyBytes:    e.integer("MAX_BODY_BYTES", 1<<20, 1024, 64<<20),
		MaxPageSize:     int(e.integer("MAX_PAGE_SIZE", 200, 1, 10_000)),
		TLSCertFile:     e.str("TLS_CERT_FILE", ""),
		TLSKeyFile:      e.str("TLS_KEY_FILE", ""),
		LogFormat:       e.str("LOG_FORMAT", "text"),
		ShutdownTimeout: e.duration("SHUTDOWN_TIMEOUT", 10*time.Second, time.Second, 10*time.Minute),

		HeartbeatDeadline:    e.duration("HEARTBEAT_DEADLINE", 5*time.Second, 500*time.Millisecond, 10*time.Minute),
		HeartbeatMinInterval: e.duration("HEARTBEAT_MIN_INTERVAL", time.Second, 10*time.Millisecond, 10*time.Minute),
		MaxFrameBytes:        int(e.integer("MAX_FRAME_BYTES", 64<<10, 1024, 1<<20)),
		LostAfter:            e.duration("LOST_AFTER", 2*time.Minute, time.Second, 7*24*time.Hour),
	}
	c.Cluster = e.str("CLUSTER", "")
	if c.Cluster != "" && c.Cluster != "etcd" {
		e.fail("CLUSTER", fmt.Sprintf("must be etcd or unset, got %q", c.Cluster))
	}
	c.EtcdEndpoints = e.list("ETCD_ENDPOINTS")
	if len(c.EtcdEndpoints) == 0 {
		c.EtcdEndpoints = []string{"http://127.0.0.1:2379"}
	}
	for _, ep := range c.EtcdEndpoints {
		if u, err := url.Parse(ep); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			e.fail("ETCD_ENDPOINTS", fmt.Sprintf("must list URLs like http://127.0.0.1:2379, got %q", ep))
		}
	}
	c.ClusterName = e.str("CLUSTER_NAME", "distributedcompute")
	if !regionPattern.MatchString(c.ClusterName) {
		e.fail("CLUSTER_NAME", "must be lowercase letters, digits and dashes")
	}
	c.ClusterAdvertiseHost = e.str("CLUSTER_ADVERTISE_HOST", "127.0.0.1")
	c.ClusterPort = int(e.integer("CLUSTER_PORT", 4100, 1, 65535))
	if c.LostAfter <= c.HeartbeatDeadline {
		e.fail("LOST_AFTER", "must be longer than HEARTBEAT_DEADLINE")
	}
	if c.HeartbeatMinInterval >= c.HeartbeatDeadline {
		e.fail("HEARTBEAT_MIN_INTERVAL", "must be shorter than HEARTBEAT_DEADLINE")
	}
	for _, cidr := range e.list("TRUSTED_PROXIES") {
		_, n, err := net.ParseCIDR(cidr)
		if err != nil {
			e.fail("TRUSTED_PROXIES", fmt.Sprintf("must list CIDR networks like 10.0.0.0/8, got %q", cidr))
			continue
		}
		c.TrustedProxies = append(c.TrustedProxies, n)
	}
	if err := c.LogLevel.UnmarshalText([]byte(e.str("LOG_LEVEL", "info"))); err != nil {
		e.fail("LOG_LEVEL", "must be debug, info, warn or error")
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		e.fail("LOG_FORMAT", "must be text or json")
	}
	if c.AuthMode != "clerk" && c.AuthMode != "dev" {
		e.fail("AUTH_MODE", fmt.Sprintf("must be clerk or dev, got %q", c.AuthMode))
	}
	if u, err := url.Parse(c.ClerkAPIURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		e.fail("CLERK_API_URL", "must be an http(s) URL")
	}
	for _, o := range c.CORSOrigins {
		if u, err := url.Parse(o); o != "*" && (err != nil || u.Scheme == "" || u.Host == "" || u.Path != "") {
			e.fail("CORS_ALLOWED_ORIGINS", fmt.Sprintf("must list origins like https://app.example.com, got %q", o))
		}
	}
	if serving && c.AuthMode == "clerk" && e.err == nil {
		if c.ClerkSecretKey == "" {
			e.fail("CLERK_SECRET_KEY", "is required when AUTH_MODE=clerk (set AUTH_MODE=dev for local development)")
		}
		pk := e.str("CLERK_PUBLISHABLE_KEY", "")
		if c.ClerkIssuer == "" {
			if pk == "" {
				e.fail("CLERK_PUBLISHABLE_KEY", "is required when AUTH_MODE=clerk and CLERK_ISSUER is not set (set AUTH_MODE=dev for local development)")
			} else if iss, err := fleethttp.IssuerFromPublishableKey(pk); err != nil {
				e.fail("CLERK_PUBLISHABLE_KEY", err.Error())
			} else {
				c.ClerkIssuer = iss
			}
		}
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		e.fail("TLS_CERT_FILE", "and TLS_KEY_FILE must be set together")
	}
	if e.err != nil {
		return nil, e.err
	}
	return c, nil
}

var errUsage = errors.New("usage")

var regionPattern = regexp.MustCompile(`^[a-z0-9]+(-[a-z0-9]+)*$`)
