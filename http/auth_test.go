package http_test

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v3"
	josejwt "github.com/go-jose/go-jose/v3/jwt"
)

const testIssuer = "https://example.clerk.accounts.dev"

// fakeClerk stands in for Clerk's Backend API: it serves /v1/jwks with keys
// the test generates, and counts how often it is asked.
type fakeClerk struct {
	*httptest.Server
	key   *rsa.PrivateKey
	kid   string
	calls atomic.Int64
}

func newFakeClerk(t *testing.T) *fakeClerk {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeClerk{key: key, kid: "ins_test_key_1"}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/jwks" || r.Header.Get("Authorization") != "Bearer sk_test_secret" {
			http.NotFound(w, r)
			return
		}
		f.calls.Add(1)
		set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &f.key.PublicKey, KeyID: f.kid, Algorithm: "RS256", Use: "sig"}}}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(set)
	}))
	t.Cleanup(f.Close)
	return f
}

// tokenOpts shapes a test token; the zero value is a valid one.
type tokenOpts struct {
	sub      string
	issuer   string
	kid      string
	exp, nbf time.Duration // relative to now; exp 0 means +1h
	noExp    bool
	azp      string
	key      *rsa.PrivateKey
	alg      jose.SignatureAlgorithm
}

func (f *fakeClerk) token(t *testing.T, o tokenOpts) string {
	t.Helper()
	if o.sub == "" {
		o.sub = "user_alice"
	}
	if o.issuer == "" {
		o.issuer = testIssuer
	}
	if o.kid == "" {
		o.kid = f.kid
	}
	if o.exp == 0 {
		o.exp = time.Hour
	}
	if o.key == nil {
		o.key = f.key
	}
	if o.alg == "" {
		o.alg = jose.RS256
	}
	now := time.Now()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: o.alg, Key: o.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", o.kid))
	if err != nil {
		t.Fatal(err)
	}
	claims := map[string]any{"iss": o.issuer, "iat": now.Add(-time.Minute).Unix(), "nbf": now.Add(o.nbf - time.Minute).Unix()}
	if o.sub != "-" {
		claims["sub"] = o.sub
	}
	if o.nbf > 0 {
		claims["nbf"] = now.Add(o.nbf).Unix()
		claims["iat"] = now.Unix()
	}
	if !o.noExp {
		claims["exp"] = now.Add(o.exp).Unix()
	}
	if o.azp != "" {
		claims["azp"] = o.azp
	}
	tok, err := josejwt.Signed(signer).Claims(claims).CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestAuthRefusals(t *testing.T) {
	env := newTestEnv(t)
	f := env.clerk
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	valid := f.token(t, tokenOpts{})
	parts := strings.Split(valid, ".")

	// tamper: change the payload, keep the signature.
	var claims map[string]any
	b, _ := josejwt.ParseSigned(valid)
	_ = b.UnsafeClaimsWithoutVerification(&claims)
	claims["sub"] = "user_mallory"
	payload, _ := json.Marshal(claims)
	tampered := parts[0] + "." + b64(payload) + "." + parts[2]
	unsigned := b64([]byte(`{"alg":"none","typ":"JWT","kid":"`+f.kid+`"}`)) + "." + parts[1] + "."

	cases := []struct {
		name, header string
	}{
		{"no header", ""},
		{"wrong scheme", "Basic " + valid},
		{"garbage", "Bearer not-a-jwt"},
		{"expired", "Bearer " + f.token(t, tokenOpts{exp: -time.Minute})},
		{"not yet valid", "Bearer " + f.token(t, tokenOpts{nbf: 10 * time.Minute})},
		{"wrong issuer", "Bearer " + f.token(t, tokenOpts{issuer: "https://other.clerk.accounts.dev"})},
		{"issuer of another Clerk instance", "Bearer " + f.token(t, tokenOpts{issuer: "https://clerk.evil.example"})},
		{"tampered", "Bearer " + tampered},
		{"unsigned", "Bearer " + unsigned},
		{"wrongly signed", "Bearer " + f.token(t, tokenOpts{key: other})},
		{"unknown key", "Bearer " + f.token(t, tokenOpts{key: other, kid: "ins_unknown"})},
		{"no exp", "Bearer " + f.token(t, tokenOpts{noExp: true})},
		{"no sub", "Bearer " + f.token(t, tokenOpts{sub: "-"})},
		{"HS256 with the public key", "Bearer " + hsToken(t, f)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := env.do(t, "GET", "/api/marketplace/my-nodes", tc.header, nil)
			res.wantError(t, 401, "UNAUTHORIZED")
			if got := string(res.body); got != `{"success":false,"error":{"code":"UNAUTHORIZED","message":"Invalid or expired token"}}`+"\n" {
				t.Fatalf("body = %s", got)
			}
		})
	}
	t.Run("valid", func(t *testing.T) {
		env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer "+valid, nil).want(t, 200)
	})
}

func hsToken(t *testing.T, f *fakeClerk) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: []byte("secret-guess-0123456789abcdef0123")},
		(&jose.SignerOptions{}).WithHeader("kid", f.kid))
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := josejwt.Signed(signer).Claims(map[string]any{"iss": testIssuer, "sub": "user_x", "exp": time.Now().Add(time.Hour).Unix()}).CompactSerialize()
	return tok
}

func TestAuthorizedParties(t *testing.T) {
	env := newTestEnv(t, func(c *envConfig) { c.parties = []string{"https://app.example.com"} })
	good := env.clerk.token(t, tokenOpts{azp: "https://app.example.com"})
	bad := env.clerk.token(t, tokenOpts{azp: "https://evil.example.com"})
	env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer "+good, nil).want(t, 200)
	env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer "+bad, nil).wantError(t, 401, "UNAUTHORIZED")
	env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer "+env.clerk.token(t, tokenOpts{}), nil).wantError(t, 401, "UNAUTHORIZED")
}

// Keys are cached by kid, and a flood of unknown kids costs Clerk only a few
// calls.
func TestJWKSCachingAndUnknownKidFlood(t *testing.T) {
	env := newTestEnv(t, func(c *envConfig) { c.rps, c.burst = 1000, 1000 })
	valid := env.clerk.token(t, tokenOpts{})
	for i := 0; i < 20; i++ {
		env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer "+valid, nil).want(t, 200)
	}
	if n := env.clerk.calls.Load(); n != 1 {
		t.Fatalf("JWKS fetched %d times for one kid, want 1", n)
	}
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	for i := 0; i < 50; i++ {
		tok := env.clerk.token(t, tokenOpts{key: other, kid: "forged_" + string(rune('a'+i%26)) + time.Now().String()})
		env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer "+tok, nil).wantError(t, 401, "UNAUTHORIZED")
	}
	if n := env.clerk.calls.Load(); n > 5 {
		t.Fatalf("JWKS fetched %d times under an unknown-kid flood, want at most 5", n)
	}
	env.do(t, "GET", "/api/marketplace/my-nodes", "Bearer "+valid, nil).want(t, 200)
}
