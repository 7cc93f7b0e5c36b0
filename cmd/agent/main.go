// Command agent is the host agent: it runs on a node, holds a WebSocket to the
// coordinator, heartbeats the machine's metrics and tells a local hook about
// rentals.
//
// Settings come from the environment and from a .env file in the working
// directory (the environment wins):
//
//	HOST_API_KEY        required; the hak_... key shown when the node was registered
//	BACKEND_WS_URL      coordinator WebSocket URL(s), comma-separated (default ws://localhost:3000/fleet)
//	HEARTBEAT_INTERVAL  Go duration between heartbeats (default 2s)
//	RENTAL_HOOK         executable run with each rental event as JSON on stdin (optional)
//	TLS_CA_FILE         PEM file of the CAs that sign the coordinator's certificate (default: system roots)
//	LOG_LEVEL           debug, info, warn or error (default info)
//
// Exit codes: 0 after SIGINT or SIGTERM, 1 when the coordinator refuses or
// revokes the key, 2 for a missing or malformed setting.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/distributedcompute/fleet"
	"github.com/joho/godotenv"
)

// Exit codes of the agent.
const (
	exitOK        = 0
	exitKeyFailed = 1
	exitBadConfig = 2
)

// Defaults of the settings and of the limits that are not settings.
const (
	defaultWSURL             = "ws://localhost:3000/fleet"
	defaultHeartbeatInterval = 2 * time.Second
	defaultBackoffMin        = 1 * time.Second
	defaultBackoffMax        = 30 * time.Second
	// A connection that stayed up this long after its welcome was healthy:
	// the next reconnect starts the backoff over. Resetting on the welcome
	// alone would let a server that welcomes and at once closes (another
	// agent with the same key, flooding) make us reconnect every second.
	defaultStableAfter  = 30 * time.Second
	defaultHookTimeout  = 30 * time.Second
	minHeartbeatSetting = 100 * time.Millisecond
	maxHeartbeatSetting = time.Hour
)

// config is the agent's settings, read once at start-up.
type config struct {
	APIKey            string
	URLs              []string
	HeartbeatInterval time.Duration
	RentalHook        string // resolved path of the executable, "" for none
	TLS               *tls.Config
	LogLevel          slog.Level

	// Not settings; tests shorten them.
	BackoffMin  time.Duration
	BackoffMax  time.Duration
	StableAfter time.Duration
	HookTimeout time.Duration
}

// loadConfig reads the settings through getenv. Its errors are one line that
// names the setting at fault, and never contain the key.
func loadConfig(getenv func(string) string) (config, error) {
	cfg := config{
		HeartbeatInterval: defaultHeartbeatInterval,
		LogLevel:          slog.LevelInfo,
		BackoffMin:        defaultBackoffMin,
		BackoffMax:        defaultBackoffMax,
		StableAfter:       defaultStableAfter,
		HookTimeout:       defaultHookTimeout,
	}

	switch key := strings.TrimSpace(getenv("HOST_API_KEY")); {
	case key == "":
		return cfg, errors.New("HOST_API_KEY is missing: set it to the hak_... key shown when the node was registered")
	case !fleet.CheckAPIKey(key):
		return cfg, fmt.Errorf("HOST_API_KEY is malformed: expected %s followed by %d letters and digits with a valid checksum (check for a copy-paste error)",
			fleet.APIKeyPrefix, fleet.APIKeyLen-len(fleet.APIKeyPrefix))
	default:
		cfg.APIKey = key
	}

	raw := getenv("BACKEND_WS_URL")
	if strings.TrimSpace(raw) == "" {
		raw = defaultWSURL
	}
	for _, s := range strings.Split(raw, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "ws" && u.Scheme != "wss") || u.Host == "" {
			return cfg, fmt.Errorf("BACKEND_WS_URL is malformed: %q is not a ws:// or wss:// URL", s)
		}
		cfg.URLs = append(cfg.URLs, s)
	}
	if len(cfg.URLs) == 0 {
		return cfg, errors.New("BACKEND_WS_URL is malformed: no URL in the list")
	}

	if s := strings.TrimSpace(getenv("HEARTBEAT_INTERVAL")); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < minHeartbeatSetting || d > maxHeartbeatSetting {
			return cfg, fmt.Errorf("HEARTBEAT_INTERVAL is malformed: %q is not a duration between %v and %v (e.g. 2s)", s, minHeartbeatSetting, maxHeartbeatSetting)
		}
		cfg.HeartbeatInterval = d
	}

	if s := strings.TrimSpace(getenv("RENTAL_HOOK")); s != "" {
		p, err := exec.LookPath(s)
		if err != nil {
			return cfg, fmt.Errorf("RENTAL_HOOK is malformed: %q is not an executable file", s)
		}
		cfg.RentalHook = p
	}

	if s := strings.TrimSpace(getenv("TLS_CA_FILE")); s != "" {
		pem, err := os.ReadFile(s)
		if err != nil {
			return cfg, fmt.Errorf("TLS_CA_FILE is malformed: cannot read %q: %v", s, errors.Unwrap(err))
		}
		// The file replaces the system roots, as curl's --cacert does: an
		// operator who names a CA means that CA.
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return cfg, fmt.Errorf("TLS_CA_FILE is malformed: %q holds no PEM certificate", s)
		}
		cfg.TLS = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}

	if s := strings.TrimSpace(getenv("LOG_LEVEL")); s != "" {
		if err := cfg.LogLevel.UnmarshalText([]byte(s)); err != nil {
			return cfg, fmt.Errorf("LOG_LEVEL is malformed: %q is not debug, info, warn or error", s)
		}
	}
	return cfg, nil
}

// keyPrefix is the part of the key that may be logged.
func (c *config) keyPrefix() string {
	if len(c.APIKey) < fleet.APIKeyShownLen {
		return ""
	}
	return c.APIKey[:fleet.APIKeyShownLen]
}

// plaintextRemote lists the URLs that would send the key unencrypted to
// another machine.
func (c *config) plaintextRemote() []string {
	var out []string
	for _, s := range c.URLs {
		u, err := url.Parse(s)
		if err != nil || u.Scheme != "ws" {
			continue
		}
		h := u.Hostname()
		if ip := net.ParseIP(h); h == "localhost" || (ip != nil && ip.IsLoopback()) {
			continue
		}
		out = append(out, s)
	}
	return out
}

func main() {
	os.Exit(agentMain())
}

func agentMain() int {
	if err := godotenv.Load(); err != nil && !errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintf(os.Stderr, "agent: .env is malformed: %v\n", err)
		return exitBadConfig
	}
	cfg, err := loadConfig(os.Getenv)
	if err != nil {
		fmt.Fprintf(os.Stderr, "agent: %v\n", err)
		return exitBadConfig
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	err = run(ctx, cfg, logger)
	switch {
	case err == nil:
		logger.Info("stopped")
		return exitOK
	case errors.Is(err, errKeyRefused), errors.Is(err, errKeyRevoked):
		logger.Error(err.Error(), "key", cfg.keyPrefix())
		return exitKeyFailed
	default:
		logger.Error("agent failed", "err", err)
		return exitKeyFailed
	}
}
