package http_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/distributedcompute/fleet"
)

type nodeJSON struct {
	ID                string         `json:"id"`
	OwnerID           string         `json:"owner_id"`
	Name              string         `json:"name"`
	Region            string         `json:"region"`
	PricePerHourCents int64          `json:"price_per_hour_cents"`
	Specs             fleet.Specs    `json:"specs"`
	Status            string         `json:"status"`
	Reliability       *float64       `json:"reliability"`
	APIKeyPrefix      *string        `json:"api_key_prefix"`
	Extra             map[string]any `json:"-"`
}

type keyJSON struct {
	Node   nodeJSON `json:"node"`
	APIKey string   `json:"api_key"`
}

func validNode(name string, price int64, model string, gpus int) map[string]any {
	return map[string]any{
		"name": name, "region": "us-east-1", "price_per_hour_cents": price,
		"specs": map[string]any{"gpu_model": model, "gpu_count": gpus, "gpu_vram_gb": 24, "cpu_cores": 16, "ram_gb": 64, "disk_gb": 500},
	}
}

func (e *testEnv) register(t *testing.T, user string, body map[string]any) keyJSON {
	t.Helper()
	var k keyJSON
	e.do(t, "POST", "/api/marketplace/nodes", e.as(t, user), body).want(t, 201).data(t, &k)
	return k
}

func TestRegisterAndRead(t *testing.T) {
	env := newTestEnv(t)
	k := env.register(t, "user_alice", validNode("rig-1", 150, "RTX 4090", 2))
	if !fleet.CheckAPIKey(k.APIKey) {
		t.Fatalf("api_key %q is not a valid host API key", k.APIKey)
	}
	if k.Node.OwnerID != "user_alice" || k.Node.Status != "offline" || k.Node.APIKeyPrefix == nil || !strings.HasPrefix(k.APIKey, *k.Node.APIKeyPrefix) {
		t.Fatalf("unexpected node %+v", k.Node)
	}
	// The public view has no private fields and no key material.
	res := env.do(t, "GET", "/api/marketplace/nodes/"+k.Node.ID, "", nil).want(t, 200)
	if bytes.Contains(res.body, []byte("api_key")) || bytes.Contains(res.body, []byte(k.APIKey[:12])) {
		t.Fatalf("public view leaks key material: %s", res.body)
	}
	var n nodeJSON
	res.data(t, &n)
	if n.Name != "rig-1" || n.Reliability == nil || *n.Reliability != 0 || n.Status != "offline" {
		t.Fatalf("public view %+v", n)
	}
	// The owner's list shows the prefix.
	var mine []nodeJSON
	env.do(t, "GET", "/api/marketplace/my-nodes", env.as(t, "user_alice"), nil).want(t, 200).data(t, &mine)
	if len(mine) != 1 || mine[0].APIKeyPrefix == nil {
		t.Fatalf("my-nodes %+v", mine)
	}
	env.do(t, "GET", "/api/marketplace/my-nodes", env.as(t, "user_bob"), nil).want(t, 200).data(t, &mine)
	if len(mine) != 0 {
		t.Fatalf("bob sees alice's nodes: %+v", mine)
	}
	env.do(t, "GET", "/api/marketplace/nodes/node_missing", "", nil).wantError(t, 404, "NOT_FOUND")
}

func TestRegisterValidation(t *testing.T) {
	env := newTestEnv(t)
	alice := env.as(t, "user_alice")
	with := func(k string, v any) map[string]any {
		b := validNode("rig", 100, "A100", 1)
		if strings.HasPrefix(k, "specs.") {
			b["specs"].(map[string]any)[strings.TrimPrefix(k, "specs.")] = v
		} else if v == nil {
			delete(b, k)
		} else {
			b[k] = v
		}
		return b
	}
	cases := []struct {
		name  string
		body  any
		field string
	}{
		{"missing name", with("name", nil), "name"},
		{"empty name", with("name", "   "), "name"},
		{"long name", with("name", strings.Repeat("x", 101)), "name"},
		{"control chars", with("name", "a\x00b"), "name"},
		{"bad region", with("region", "US East"), "region"},
		{"missing region", with("region", nil), "region"},
		{"zero price", with("price_per_hour_cents", 0), "price_per_hour_cents"},
		{"negative price", with("price_per_hour_cents", -5), "price_per_hour_cents"},
		{"price as string", with("price_per_hour_cents", "100"), "price_per_hour_cents"},
		{"missing specs", with("specs", nil), "specs"},
		{"too many gpus", with("specs.gpu_count", 65), "specs.gpu_count"},
		{"gpus without model", with("specs.gpu_model", ""), "specs.gpu_model"},
		{"no cpu", with("specs.cpu_cores", 0), "specs.cpu_cores"},
		{"no ram", with("specs.ram_gb", 0), "specs.ram_gb"},
		{"negative disk", with("specs.disk_gb", -1), "specs.disk_gb"},
		{"unknown field", with("status", "online"), "status"},
		{"owner is not editable", with("owner_id", "user_bob"), "owner_id"},
		{"malformed json", `{"name":`, "body"},
		{"not an object", `[1,2]`, "body"},
		{"trailing data", `{"name":"a"} {}`, "body"},
		{"empty body", ``, "body"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := env.do(t, "POST", "/api/marketplace/nodes", alice, tc.body).wantError(t, 400, "VALIDATION_ERROR")
			if _, ok := e.Error.Details[tc.field]; !ok {
				t.Fatalf("details %v do not name %s", e.Error.Details, tc.field)
			}
		})
	}
	var mine []nodeJSON
	env.do(t, "GET", "/api/marketplace/my-nodes", alice, nil).want(t, 200).data(t, &mine)
	if len(mine) != 0 {
		t.Fatalf("invalid registrations stored %d nodes", len(mine))
	}
}

func TestUpdateDeleteOwnership(t *testing.T) {
	env := newTestEnv(t)
	alice, bob := env.as(t, "user_alice"), env.as(t, "user_bob")
	k := env.register(t, "user_alice", validNode("rig", 100, "A100", 1))
	path := "/api/marketplace/nodes/" + k.Node.ID

	env.do(t, "PUT", path, bob, map[string]any{"name": "stolen"}).wantError(t, 403, "FORBIDDEN")
	env.do(t, "DELETE", path, bob, nil).wantError(t, 403, "FORBIDDEN")
	env.do(t, "POST", path+"/api-key", bob, nil).wantError(t, 403, "FORBIDDEN")
	env.do(t, "DELETE", path+"/api-key", bob, nil).wantError(t, 403, "FORBIDDEN")
	env.do(t, "PUT", "/api/marketplace/nodes/node_missing", alice, map[string]any{"name": "x"}).wantError(t, 404, "NOT_FOUND")
	env.do(t, "PUT", path, alice, map[string]any{"status": "online"}).wantError(t, 400, "VALIDATION_ERROR")
	env.do(t, "PUT", path, alice, map[string]any{"price_per_hour_cents": 0}).wantError(t, 400, "VALIDATION_ERROR")

	var n nodeJSON
	env.do(t, "PUT", path, alice, map[string]any{"name": "renamed", "price_per_hour_cents": 250}).want(t, 200).data(t, &n)
	if n.Name != "renamed" || n.PricePerHourCents != 250 || n.Region != "us-east-1" || n.Specs.GPUModel != "A100" {
		t.Fatalf("update gave %+v", n)
	}
	env.do(t, "GET", path, "", nil).want(t, 200).data(t, &n)
	if n.Name != "renamed" {
		t.Fatalf("update not stored: %+v", n)
	}
	env.do(t, "DELETE", path, alice, nil).want(t, 200)
	env.do(t, "GET", path, "", nil).wantError(t, 404, "NOT_FOUND")
	env.do(t, "DELETE", path, alice, nil).wantError(t, 404, "NOT_FOUND")
	if _, err := env.store.NodeByKeyHash(t.Context(), fleet.HashAPIKey(k.APIKey)); fleet.ErrorCode(err) != fleet.ENOTFOUND {
		t.Fatalf("deleted node's key still resolves: %v", err)
	}
}

func TestRotateAndRevokeKey(t *testing.T) {
	env := newTestEnv(t)
	alice := env.as(t, "user_alice")
	k := env.register(t, "user_alice", validNode("rig", 100, "A100", 1))
	path := "/api/marketplace/nodes/" + k.Node.ID + "/api-key"

	var rotated keyJSON
	res := env.do(t, "POST", path, alice, nil).want(t, 200)
	res.data(t, &rotated)
	if res.header.Get("Cache-Control") != "no-store" {
		t.Fatalf("key answer is cacheable")
	}
	if rotated.APIKey == k.APIKey || !fleet.CheckAPIKey(rotated.APIKey) {
		t.Fatalf("rotation gave %q", rotated.APIKey)
	}
	ctx := t.Context()
	if _, err := env.store.NodeByKeyHash(ctx, fleet.HashAPIKey(k.APIKey)); fleet.ErrorCode(err) != fleet.ENOTFOUND {
		t.Fatalf("old key still resolves: %v", err)
	}
	if n, err := env.store.NodeByKeyHash(ctx, fleet.HashAPIKey(rotated.APIKey)); err != nil || n.ID != k.Node.ID {
		t.Fatalf("new key does not resolve: %v", err)
	}
	var n nodeJSON
	env.do(t, "DELETE", path, alice, nil).want(t, 200).data(t, &n)
	if n.APIKeyPrefix == nil || *n.APIKeyPrefix != "" {
		t.Fatalf("revoked node still shows a key prefix: %+v", n)
	}
	if _, err := env.store.NodeByKeyHash(ctx, fleet.HashAPIKey(rotated.APIKey)); fleet.ErrorCode(err) != fleet.ENOTFOUND {
		t.Fatalf("revoked key still resolves: %v", err)
	}
}

func TestListingFiltersSortAndCursor(t *testing.T) {
	env := newTestEnv(t)
	for i := 0; i < 25; i++ {
		model := "RTX 4090"
		if i%2 == 1 {
			model = "A100"
		}
		body := validNode(fmt.Sprintf("rig-%02d", i), int64(100+i%5*10), model, 1+i%4)
		if i%5 == 0 {
			body["region"] = "eu-west-1"
		}
		env.register(t, "user_alice", body)
	}
	list := func(q string) ([]nodeJSON, map[string]any) {
		var out []nodeJSON
		res := env.do(t, "GET", "/api/marketplace/nodes"+q, "", nil).want(t, 200)
		res.data(t, &out)
		return out, res.meta(t)
	}
	all, _ := list("?limit=200")
	if len(all) != 25 {
		t.Fatalf("listing has %d nodes, want 25", len(all))
	}
	for _, n := range all {
		if n.APIKeyPrefix != nil {
			t.Fatalf("public listing shows api_key_prefix")
		}
	}
	a100, _ := list("?gpu_model=a100&limit=200")
	for _, n := range a100 {
		if n.Specs.GPUModel != "A100" {
			t.Fatalf("gpu_model filter let %q through", n.Specs.GPUModel)
		}
	}
	if len(a100) != 12 {
		t.Fatalf("A100 nodes: %d, want 12", len(a100))
	}
	cheap, _ := list("?max_price=110&min_gpus=2&region=us-east-1&limit=200")
	for _, n := range cheap {
		if n.PricePerHourCents > 110 || n.Specs.GPUCount < 2 || n.Region != "us-east-1" {
			t.Fatalf("filters let %+v through", n)
		}
	}
	if len(cheap) == 0 {
		t.Fatal("filters matched nothing")
	}
	if off, _ := list("?status=online"); len(off) != 0 {
		t.Fatalf("%d nodes online with no agents", len(off))
	}
	// Walk the pages of a sorted listing: every node once, in order.
	seen := map[string]bool{}
	var prev int64 = -1
	cursor, firstCursor := "", ""
	for pages := 0; ; pages++ {
		q := "?sort=price&limit=7"
		if cursor != "" {
			q += "&cursor=" + cursor
		}
		page, meta := list(q)
		for _, n := range page {
			if seen[n.ID] {
				t.Fatalf("node %s on two pages", n.ID)
			}
			seen[n.ID] = true
			if n.PricePerHourCents < prev {
				t.Fatalf("not sorted by price")
			}
			prev = n.PricePerHourCents
		}
		next, _ := meta["next_cursor"].(string)
		if next == "" {
			break
		}
		if firstCursor == "" {
			firstCursor = next
		}
		if pages > 10 {
			t.Fatal("pagination does not end")
		}
		cursor = next
	}
	if len(seen) != 25 {
		t.Fatalf("pages covered %d nodes, want 25", len(seen))
	}
	desc, _ := list("?sort=-price&limit=200")
	if desc[0].PricePerHourCents < desc[len(desc)-1].PricePerHourCents {
		t.Fatal("-price is not descending")
	}
	for _, q := range []string{"?limit=0", "?limit=201", "?limit=x", "?sort=owner", "?status=busy", "?min_gpus=-1", "?max_price=abc", "?cursor=!!", "?sort=-price&cursor=" + firstCursor} {
		env.do(t, "GET", "/api/marketplace/nodes"+q, "", nil).wantError(t, 400, "VALIDATION_ERROR")
	}
}

func TestStats(t *testing.T) {
	env := newTestEnv(t)
	var empty map[string]any
	env.do(t, "GET", "/api/marketplace/stats", "", nil).want(t, 200).data(t, &empty)
	if empty["total_nodes"].(float64) != 0 {
		t.Fatalf("stats of an empty marketplace: %v", empty)
	}
	env.register(t, "user_alice", validNode("a", 100, "A100", 2))
	env.register(t, "user_alice", validNode("b", 300, "A100", 1))
	env.register(t, "user_bob", validNode("c", 200, "RTX 4090", 4))
	var s struct {
		Total, Online, Offline, GPUs, OnlineGPUs int
		ByModel                                  map[string]struct{ GPUs, Nodes int }
		Price                                    struct{ Min, Median, Max int64 }
	}
	var raw map[string]json.RawMessage
	env.do(t, "GET", "/api/marketplace/stats", "", nil).want(t, 200).data(t, &raw)
	_ = json.Unmarshal(raw["total_nodes"], &s.Total)
	_ = json.Unmarshal(raw["online_nodes"], &s.Online)
	_ = json.Unmarshal(raw["offline_nodes"], &s.Offline)
	_ = json.Unmarshal(raw["total_gpus"], &s.GPUs)
	_ = json.Unmarshal(raw["online_gpus"], &s.OnlineGPUs)
	_ = json.Unmarshal(raw["gpus_by_model"], &s.ByModel)
	_ = json.Unmarshal(raw["price_per_hour_cents"], &s.Price)
	if s.Total != 3 || s.Online != 0 || s.Offline != 3 || s.GPUs != 7 || s.OnlineGPUs != 0 ||
		s.ByModel["A100"].GPUs != 3 || s.ByModel["A100"].Nodes != 2 || s.ByModel["RTX 4090"].GPUs != 4 ||
		s.Price.Min != 100 || s.Price.Median != 200 || s.Price.Max != 300 {
		t.Fatalf("stats %+v", s)
	}
}

func TestEnvelopesForRoutingAndLimits(t *testing.T) {
	env := newTestEnv(t, func(c *envConfig) { c.maxBody = 4096 })
	alice := env.as(t, "user_alice")
	env.do(t, "GET", "/api/nope", "", nil).wantError(t, 404, "NOT_FOUND")
	res := env.do(t, "PATCH", "/api/marketplace/nodes", alice, nil)
	res.wantError(t, 405, "METHOD_NOT_ALLOWED")
	if allow := res.header.Get("Allow"); !strings.Contains(allow, "GET") || !strings.Contains(allow, "POST") {
		t.Fatalf("Allow = %q", allow)
	}
	big := validNode(strings.Repeat("x", 10), 100, "A100", 1)
	big["name"] = strings.Repeat("y", 5000)
	env.do(t, "POST", "/api/marketplace/nodes", alice, big).wantError(t, 413, "PAYLOAD_TOO_LARGE")
	// A body whose length is not announced is cut off while reading.
	req, _ := http.NewRequest("POST", env.srv.URL+"/api/marketplace/nodes", &chunked{n: 8000})
	req.Header.Set("Authorization", alice)
	req.Header.Set("Content-Type", "application/json")
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != 413 {
		t.Fatalf("chunked oversized body: %d", r.StatusCode)
	}
	env.do(t, "POST", "/api/marketplace/nodes", alice, "name=x").wantError(t, 400, "VALIDATION_ERROR")
	if res := env.do(t, "GET", "/healthz", "", nil); res.status != 200 || res.header.Get("X-Request-Id") == "" {
		t.Fatalf("healthz %d %v", res.status, res.header)
	}
	env.do(t, "GET", "/readyz", "", nil).want(t, 200)
}

type chunked struct{ n int }

func (c *chunked) Read(p []byte) (int, error) {
	if c.n <= 0 {
		return 0, io.EOF
	}
	for i := range p {
		p[i] = ' '
	}
	if len(p) > c.n {
		p = p[:c.n]
	}
	c.n -= len(p)
	return len(p), nil
}

func TestRateLimits(t *testing.T) {
	env := newTestEnv(t, func(c *envConfig) { c.rps, c.burst = 0.5, 3 })
	alice, bob := env.as(t, "user_alice"), env.as(t, "user_bob")
	for i := 0; i < 3; i++ {
		res := env.do(t, "GET", "/api/marketplace/my-nodes", alice, nil).want(t, 200)
		if res.header.Get("RateLimit-Policy") != `"per-user";q=3;w=6` || !strings.HasPrefix(res.header.Get("RateLimit"), `"per-user";r=`) {
			t.Fatalf("rate limit headers %v", res.header)
		}
	}
	res := env.do(t, "GET", "/api/marketplace/my-nodes", alice, nil)
	res.wantError(t, 429, "RATE_LIMITED")
	if res.header.Get("Retry-After") == "" {
		t.Fatal("429 without Retry-After")
	}
	// Another user has a bucket of their own.
	env.do(t, "GET", "/api/marketplace/my-nodes", bob, nil).want(t, 200)
	// Public routes are limited per IP.
	for i := 0; i < 3; i++ {
		env.do(t, "GET", "/api/marketplace/nodes", "", nil).want(t, 200)
	}
	env.do(t, "GET", "/api/marketplace/nodes", "", nil).wantError(t, 429, "RATE_LIMITED")
}

// Refused tokens are limited per client address before any verification.
func TestBadTokenFloodIsLimited(t *testing.T) {
	env := newTestEnv(t, func(c *envConfig) { c.rps, c.burst = 0.5, 3 })
	for i := 0; i < 3; i++ {
		env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer forged", nil).wantError(t, 401, "UNAUTHORIZED")
	}
	calls := env.clerk.calls.Load()
	res := env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer "+env.clerk.token(t, tokenOpts{kid: "forged"}), nil)
	res.wantError(t, 429, "RATE_LIMITED")
	if res.header.Get("Retry-After") == "" || env.clerk.calls.Load() != calls {
		t.Fatal("a blocked address still cost a verification")
	}
}

// Many registrations at once all land (the store coalesces the writes).
func TestConcurrentRegistrations(t *testing.T) {
	env := newTestEnv(t)
	alice := env.as(t, "user_alice")
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := env.do(t, "POST", "/api/marketplace/nodes", alice, validNode(fmt.Sprintf("n%d", i), 100, "A100", 1))
			if res.status != 201 {
				t.Errorf("registration %d: %d %s", i, res.status, res.body)
			}
		}()
	}
	wg.Wait()
	var mine []nodeJSON
	env.do(t, "GET", "/api/marketplace/my-nodes", alice, nil).want(t, 200).data(t, &mine)
	if len(mine) != 50 {
		t.Fatalf("%d nodes stored, want 50", len(mine))
	}
}

// The raw host API key is never stored and never logged.
func TestRawKeyNeitherStoredNorLogged(t *testing.T) {
	var logs syncBuffer
	env := newTestEnv(t, func(c *envConfig) { c.logs = &logs })
	k := env.register(t, "user_alice", validNode("rig", 100, "A100", 1))
	var rotated keyJSON
	env.do(t, "POST", "/api/marketplace/nodes/"+k.Node.ID+"/api-key", env.as(t, "user_alice"), nil).want(t, 200).data(t, &rotated)
	env.store.Close()
	db, err := os.ReadFile(filepath.Join(env.dir, "coordinator.db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{k.APIKey, rotated.APIKey} {
		secret := key[fleet.APIKeyShownLen:]
		if bytes.Contains(db, []byte(secret)) {
			t.Fatal("raw API key found in the data file")
		}
		if strings.Contains(logs.String(), secret) {
			t.Fatal("raw API key found in the logs")
		}
	}
	if !strings.Contains(logs.String(), k.Node.ID) {
		t.Fatal("logs were not captured")
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestOpenAPIDescribesEveryRoute(t *testing.T) {
	env := newTestEnv(t)
	var doc struct {
		Paths map[string]map[string]any `json:"paths"`
	}
	res := env.do(t, "GET", "/api/openapi.json", "", nil)
	if res.status != 200 {
		t.Fatalf("openapi: %d", res.status)
	}
	if err := json.Unmarshal(res.body, &doc); err != nil {
		t.Fatal(err)
	}
	for _, r := range routes(t) {
		p := strings.ReplaceAll(r.path, ":id", "{id}")
		if doc.Paths[p][strings.ToLower(r.method)] == nil {
			t.Errorf("route %s %s missing from openapi.json", r.method, r.path)
		}
	}
}

// No origin is allowed unless configured; a configured one gets its
// preflight answered.
func TestCORS(t *testing.T) {
	preflight := func(env *testEnv) *http.Response {
		req, _ := http.NewRequest(http.MethodOptions, env.srv.URL+"/api/marketplace/nodes", nil)
		req.Header.Set("Origin", "https://app.example.com")
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "authorization,idempotency-key")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res
	}
	if res := preflight(newTestEnv(t)); res.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("an unconfigured origin was allowed: %v", res.Header)
	}
	env := newTestEnv(t, func(c *envConfig) { c.origins = []string{"https://app.example.com"} })
	res := preflight(env)
	if res.Header.Get("Access-Control-Allow-Origin") != "https://app.example.com" ||
		!strings.Contains(strings.ToLower(res.Header.Get("Access-Control-Allow-Headers")), "idempotency-key") {
		t.Fatalf("preflight of a configured origin: %d %v", res.StatusCode, res.Header)
	}
	r := env.do(t, "GET", "/api/marketplace/nodes", "", nil)
	if r.status != 200 {
		t.Fatal(r.status)
	}
}
