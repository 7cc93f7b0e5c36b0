package http_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/distributedcompute/fleet/actors"
	fleethttp "github.com/distributedcompute/fleet/http"
	"github.com/distributedcompute/fleet/persistence"
)

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

type envConfig struct {
	parties []string
	rps     float64
	burst   int
	maxBody int64
	fleet   fleethttp.Fleet
	logs    io.Writer
	// actors, when set, runs the real actor system with these settings.
	actors  *actors.Config
	origins []string
}

// testEnv is the real Echo server on a real bbolt file, with the real Clerk
// SDK path against a fake of Clerk's key endpoint.
type testEnv struct {
	clerk *fakeClerk
	store *persistence.Store
	fleet *actors.System
	srv   *httptest.Server
	dir   string
}

func newTestEnv(t *testing.T, opts ...func(*envConfig)) *testEnv {
	t.Helper()
	c := envConfig{rps: 1000, burst: 1000, logs: io.Discard}
	for _, o := range opts {
		o(&c)
	}
	f := newFakeClerk(t)
	dir := t.TempDir()
	store, err := persistence.Open(filepath.Join(dir, "coordinator.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	log := slog.New(slog.NewTextHandler(c.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	var system *actors.System
	if c.actors != nil {
		ac := *c.actors
		ac.Nodes, ac.Sessions, ac.Rentals, ac.Logger = store, store, store, log
		system, err = actors.New(ac)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = system.Shutdown(context.Background()) })
		c.fleet = system
	}
	var billing fleethttp.Billing
	if system != nil {
		billing = system
	}
	srv := fleethttp.NewServer(fleethttp.Config{
		Nodes:    store,
		Sessions: store,
		Fleet:    c.fleet,
		Billing:  billing,
		Rentals:  store,
		Verifier: &fleethttp.Verifier{
			Issuer:            testIssuer,
			AuthorizedParties: c.parties,
			Keys:              fleethttp.NewClerkKeys(f.URL+"/v1", "sk_test_secret", log),
			Leeway:            5 * time.Second,
		},
		Logger:             log,
		RateLimitRPS:       c.rps,
		RateLimitBurst:     c.burst,
		MaxBodyBytes:       c.maxBody,
		CORSAllowedOrigins: c.origins,
	})
	ts := httptest.NewServer(srv.Echo())
	t.Cleanup(ts.Close)
	return &testEnv{clerk: f, store: store, fleet: system, srv: ts, dir: dir}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (e *testEnv) do(t *testing.T, method, path, auth string, body any) *response {
	t.Helper()
	return e.doH(t, method, path, auth, body, nil)
}

func (e *testEnv) doH(t *testing.T, method, path, auth string, body any, headers map[string]string) *response {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = bytes.NewBufferString(b)
	case []byte:
		r = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, r)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return &response{status: res.StatusCode, header: res.Header, body: b}
}

// as returns an Authorization header for user.
func (e *testEnv) as(t *testing.T, user string) string {
	return "Bearer " + e.clerk.token(t, tokenOpts{sub: user})
}

func (r *response) want(t *testing.T, status int) *response {
	t.Helper()
	if r.status != status {
		t.Fatalf("status = %d, want %d; body %s", r.status, status, r.body)
	}
	var env struct {
		Success bool `json:"success"`
	}
	if err := json.Unmarshal(r.body, &env); err != nil || !env.Success {
		t.Fatalf("not a success envelope: %s", r.body)
	}
	return r
}

type errEnvelope struct {
	Success *bool `json:"success"`
	Error   struct {
		Code    string            `json:"code"`
		Message string            `json:"message"`
		Details map[string]string `json:"details"`
	} `json:"error"`
}

func (r *response) wantError(t *testing.T, status int, code string) errEnvelope {
	t.Helper()
	var env errEnvelope
	if r.status != status {
		t.Fatalf("status = %d, want %d; body %s", r.status, status, r.body)
	}
	if err := json.Unmarshal(r.body, &env); err != nil || env.Success == nil || *env.Success || env.Error.Code != code || env.Error.Message == "" {
		t.Fatalf("want error envelope with code %s, got %s", code, r.body)
	}
	return env
}

// data decodes the "data" of a success envelope into v.
func (r *response) data(t *testing.T, v any) {
	t.Helper()
	var env struct {
		Data json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(r.body, &env); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(env.Data, v); err != nil {
		t.Fatalf("decode data: %v: %s", err, env.Data)
	}
}

func (r *response) meta(t *testing.T) map[string]any {
	t.Helper()
	var env struct {
		Meta map[string]any `json:"meta"`
	}
	if err := json.Unmarshal(r.body, &env); err != nil {
		t.Fatal(err)
	}
	return env.Meta
}

type route struct{ method, path string }

// routes lists what the server routes, without Echo's own catch-alls.
func routes(t *testing.T) []route {
	t.Helper()
	srv := fleethttp.NewServer(fleethttp.Config{})
	var out []route
	for _, r := range srv.Echo().Routes() {
		switch r.Method {
		case "GET", "POST", "PUT", "DELETE", "PATCH":
			if !strings.Contains(r.Path, "*") {
				out = append(out, route{r.Method, r.Path})
			}
		}
	}
	if len(out) < 10 {
		t.Fatalf("only %d routes found", len(out))
	}
	return out
}
