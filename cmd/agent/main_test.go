package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
)

func TestLoadConfig(t *testing.T) {
	key := fleet.NewAPIKey().Raw
	// A well-formed key with a wrong checksum.
	last := byte('A')
	if key[len(key)-1] == last {
		last = 'B'
	}
	badSum := key[:len(key)-1] + string(last)
	dir := t.TempDir()
	notExec := filepath.Join(dir, "hook.txt")
	if err := os.WriteFile(notExec, []byte("echo"), 0o644); err != nil {
		t.Fatal(err)
	}
	hook := filepath.Join(dir, "hook.sh")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(garbage, []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		env     map[string]string
		wantErr string // prefix of the error; "" for none
		check   func(t *testing.T, c config)
	}{
		{name: "missing key", env: map[string]string{}, wantErr: "HOST_API_KEY is missing"},
		{name: "blank key", env: map[string]string{"HOST_API_KEY": "  "}, wantErr: "HOST_API_KEY is missing"},
		{name: "not a hak key", env: map[string]string{"HOST_API_KEY": "sk_test_123"}, wantErr: "HOST_API_KEY is malformed"},
		{name: "short key", env: map[string]string{"HOST_API_KEY": "hak_abc"}, wantErr: "HOST_API_KEY is malformed"},
		{name: "bad checksum", env: map[string]string{"HOST_API_KEY": badSum}, wantErr: "HOST_API_KEY is malformed"},
		{
			name: "defaults",
			env:  map[string]string{"HOST_API_KEY": key},
			check: func(t *testing.T, c config) {
				if c.APIKey != key || !slices.Equal(c.URLs, []string{defaultWSURL}) ||
					c.HeartbeatInterval != 2*time.Second || c.LogLevel != slog.LevelInfo ||
					c.RentalHook != "" || c.TLS != nil ||
					c.BackoffMin != time.Second || c.BackoffMax != 30*time.Second {
					t.Errorf("config = %+v", c)
				}
			},
		},
		{
			name: "key with surrounding space",
			env:  map[string]string{"HOST_API_KEY": " " + key + "\n"},
			check: func(t *testing.T, c config) {
				if c.APIKey != key {
					t.Errorf("APIKey not trimmed")
				}
			},
		},
		{
			name: "everything set",
			env: map[string]string{
				"HOST_API_KEY":       key,
				"BACKEND_WS_URL":     "wss://a.example/fleet, ws://127.0.0.1:3000/fleet,",
				"HEARTBEAT_INTERVAL": "1500ms",
				"RENTAL_HOOK":        hook,
				"LOG_LEVEL":          "DEBUG",
			},
			check: func(t *testing.T, c config) {
				if !slices.Equal(c.URLs, []string{"wss://a.example/fleet", "ws://127.0.0.1:3000/fleet"}) {
					t.Errorf("URLs = %q", c.URLs)
				}
				if c.HeartbeatInterval != 1500*time.Millisecond {
					t.Errorf("HeartbeatInterval = %v", c.HeartbeatInterval)
				}
				if c.RentalHook != hook {
					t.Errorf("RentalHook = %q", c.RentalHook)
				}
				if c.LogLevel != slog.LevelDebug {
					t.Errorf("LogLevel = %v", c.LogLevel)
				}
			},
		},
		{name: "http URL", env: map[string]string{"HOST_API_KEY": key, "BACKEND_WS_URL": "http://localhost:3000/fleet"}, wantErr: "BACKEND_WS_URL is malformed"},
		{name: "URL without host", env: map[string]string{"HOST_API_KEY": key, "BACKEND_WS_URL": "ws:///fleet"}, wantErr: "BACKEND_WS_URL is malformed"},
		{name: "empty URL list", env: map[string]string{"HOST_API_KEY": key, "BACKEND_WS_URL": " , "}, wantErr: "BACKEND_WS_URL is malformed"},
		{name: "interval without unit", env: map[string]string{"HOST_API_KEY": key, "HEARTBEAT_INTERVAL": "2"}, wantErr: "HEARTBEAT_INTERVAL is malformed"},
		{name: "zero interval", env: map[string]string{"HOST_API_KEY": key, "HEARTBEAT_INTERVAL": "0s"}, wantErr: "HEARTBEAT_INTERVAL is malformed"},
		{name: "negative interval", env: map[string]string{"HOST_API_KEY": key, "HEARTBEAT_INTERVAL": "-2s"}, wantErr: "HEARTBEAT_INTERVAL is malformed"},
		{name: "missing hook", env: map[string]string{"HOST_API_KEY": key, "RENTAL_HOOK": filepath.Join(dir, "nope")}, wantErr: "RENTAL_HOOK is malformed"},
		{name: "hook not executable", env: map[string]string{"HOST_API_KEY": key, "RENTAL_HOOK": notExec}, wantErr: "RENTAL_HOOK is malformed"},
		{name: "missing CA file", env: map[string]string{"HOST_API_KEY": key, "TLS_CA_FILE": filepath.Join(dir, "nope.pem")}, wantErr: "TLS_CA_FILE is malformed"},
		{name: "CA file without PEM", env: map[string]string{"HOST_API_KEY": key, "TLS_CA_FILE": garbage}, wantErr: "TLS_CA_FILE is malformed"},
		{name: "bad log level", env: map[string]string{"HOST_API_KEY": key, "LOG_LEVEL": "loud"}, wantErr: "LOG_LEVEL is malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := loadConfig(func(k string) string { return tt.env[k] })
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("loadConfig: %v", err)
				}
				tt.check(t, c)
				return
			}
			if err == nil {
				t.Fatalf("loadConfig succeeded, want error %q", tt.wantErr)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, tt.wantErr) {
				t.Errorf("error = %q, want prefix %q", msg, tt.wantErr)
			}
			if strings.Contains(msg, "\n") {
				t.Errorf("error is not one line: %q", msg)
			}
			if k := tt.env["HOST_API_KEY"]; len(k) > 4 && strings.Contains(msg, strings.TrimSpace(k)) {
				t.Errorf("error shows the key: %q", msg)
			}
		})
	}
}

func TestPlaintextRemote(t *testing.T) {
	c := config{URLs: []string{"ws://localhost:3000/fleet", "ws://127.0.0.1/fleet", "ws://[::1]/fleet", "wss://a.example/fleet", "ws://b.example/fleet"}}
	if got := c.plaintextRemote(); !slices.Equal(got, []string{"ws://b.example/fleet"}) {
		t.Errorf("plaintextRemote = %q", got)
	}
}
