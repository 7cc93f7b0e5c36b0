package http

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/clerk/clerk-sdk-go/v2"
	"github.com/clerk/clerk-sdk-go/v2/jwks"
	clerkjwt "github.com/clerk/clerk-sdk-go/v2/jwt"
	"github.com/go-jose/go-jose/v3"
	josejwt "github.com/go-jose/go-jose/v3/jwt"
	"github.com/labstack/echo/v4"
	"golang.org/x/time/rate"
)

// DevIssuer is the issuer of tokens minted in dev mode.
const DevIssuer = "https://dev.distributedcompute.invalid"

// KeySource finds the public key a session token names by its kid.
type KeySource interface {
	Key(ctx context.Context, kid string) (*clerk.JSONWebKey, error)
}

// Verifier checks session JWTs. The Clerk SDK checks the signature, exp, nbf
// and iat; Verifier adds what the SDK leaves to its caller: the issuer must be
// this instance's, exp and sub must be present, and azp must be one of the
// authorized parties when they are configured.
type Verifier struct {
	Issuer            string
	AuthorizedParties []string
	Keys              KeySource
	// Leeway absorbs clock skew on exp and nbf.
	Leeway time.Duration
	// Clock is the time source; nil means the system clock.
	Clock clerk.Clock
}

// Verify returns the user ID (sub) of a valid token.
func (v *Verifier) Verify(ctx context.Context, token string) (string, error) {
	parsed, err := josejwt.ParseSigned(token)
	if err != nil {
		return "", fmt.Errorf("parse: %w", err)
	}
	if len(parsed.Headers) != 1 {
		return "", errors.New("token must have exactly one signature")
	}
	jwk, err := v.Keys.Key(ctx, parsed.Headers[0].KeyID)
	if err != nil {
		return "", err
	}
	issuer := v.Issuer
	params := &clerkjwt.VerifyParams{
		Token:  token,
		JWK:    jwk,
		Clock:  v.Clock,
		Leeway: v.Leeway,
		// With ProxyURL set the SDK requires iss to equal it exactly, which
		// pins tokens to this instance rather than to any Clerk instance.
		ProxyURL: &issuer,
	}
	if len(v.AuthorizedParties) > 0 {
		params.AuthorizedPartyHandler = func(azp string) bool {
			for _, p := range v.AuthorizedParties {
				if azp == p {
					return true
				}
			}
			return false
		}
	}
	claims, err := clerkjwt.Verify(ctx, params)
	if err != nil {
		return "", err
	}
	if claims.Expiry == nil {
		return "", errors.New("token has no exp claim")
	}
	if claims.Subject == "" {
		return "", errors.New("token has no sub claim")
	}
	return claims.Subject, nil
}

// ClerkKeys fetches the instance's JWKS from Clerk's Backend API and caches
// the keys by kid. A token naming an unknown kid triggers a refetch, but at
// most a few a minute, so forged kids cannot turn us into a Clerk flooder.
type ClerkKeys struct {
	client  *jwks.Client
	refetch *rate.Limiter
	log     *slog.Logger

	fetchMu sync.Mutex // one fetch at a time
	mu      sync.RWMutex
	keys    map[string]*clerk.JSONWebKey
}

// NewClerkKeys returns a key source for the Backend API at apiURL (Clerk's
// own by default, "https://api.clerk.com/v1") authenticated with secretKey.
func NewClerkKeys(apiURL, secretKey string, log *slog.Logger) *ClerkKeys {
	cfg := &clerk.ClientConfig{}
	cfg.URL = clerk.String(apiURL)
	cfg.Key = clerk.String(secretKey)
	cfg.HTTPClient = &nethttpClient
	return &ClerkKeys{
		client:  jwks.NewClient(cfg),
		refetch: rate.NewLimiter(rate.Every(15*time.Second), 4),
		log:     log,
		keys:    map[string]*clerk.JSONWebKey{},
	}
}

// Key returns the cached key for kid, fetching the key set if kid is unknown
// and the refetch budget allows.
func (k *ClerkKeys) Key(ctx context.Context, kid string) (*clerk.JSONWebKey, error) {
	if kid == "" {
		return nil, errors.New("token has no kid")
	}
	if key := k.cached(kid); key != nil {
		return key, nil
	}
	k.fetchMu.Lock()
	defer k.fetchMu.Unlock()
	if key := k.cached(kid); key != nil { // fetched while we waited
		return key, nil
	}
	if !k.refetch.Allow() {
		return nil, fmt.Errorf("unknown kid %q and JWKS refetch budget spent", kid)
	}
	if err := k.fetch(ctx); err != nil {
		return nil, err
	}
	if key := k.cached(kid); key != nil {
		return key, nil
	}
	return nil, fmt.Errorf("unknown kid %q", kid)
}

// fetch replaces the cached key set with Clerk's current one, so keys Clerk
// has retired stop being trusted. Callers hold fetchMu.
func (k *ClerkKeys) fetch(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	set, err := k.client.Get(ctx, &jwks.GetParams{})
	if err != nil {
		k.log.Warn("fetching Clerk JWKS failed", "error", err)
		return fmt.Errorf("fetch jwks: %w", err)
	}
	keys := make(map[string]*clerk.JSONWebKey, len(set.Keys))
	for _, key := range set.Keys {
		if key != nil && key.KeyID != "" {
			keys[key.KeyID] = key
		}
	}
	k.mu.Lock()
	k.keys = keys
	k.mu.Unlock()
	k.log.Info("fetched Clerk JWKS", "keys", len(keys))
	return nil
}

// Run refreshes the key set every interval until ctx ends. This refresh
// does not draw on the budget unknown kids spend, so a flood of forged kids
// cannot keep a rotated-in key from being learnt.
func (k *ClerkKeys) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		k.fetchMu.Lock()
		_ = k.fetch(ctx)
		k.fetchMu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (k *ClerkKeys) cached(kid string) *clerk.JSONWebKey {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.keys[kid]
}

// IssuerFromPublishableKey derives the Frontend API URL, the issuer of the
// instance's session tokens, from a Clerk publishable key
// (pk_test_ or pk_live_ followed by base64 of "host$").
func IssuerFromPublishableKey(pk string) (string, error) {
	var enc string
	switch {
	case strings.HasPrefix(pk, "pk_test_"):
		enc = strings.TrimPrefix(pk, "pk_test_")
	case strings.HasPrefix(pk, "pk_live_"):
		enc = strings.TrimPrefix(pk, "pk_live_")
	default:
		return "", errors.New("publishable key must start with pk_test_ or pk_live_")
	}
	raw, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(enc, "="))
	if err != nil {
		return "", errors.New("publishable key is not valid base64")
	}
	host, ok := strings.CutSuffix(string(raw), "$")
	if !ok || host == "" || strings.ContainsAny(host, "/$ ") {
		return "", errors.New("publishable key does not encode a Frontend API host")
	}
	return "https://" + host, nil
}

// DevKeys signs and serves the key of dev mode. The key is kept under the
// data directory so that tokens survive a restart.
type DevKeys struct {
	priv *rsa.PrivateKey
	jwk  *clerk.JSONWebKey
}

// LoadDevKeys reads the dev signing key from dir, creating it on first use.
func LoadDevKeys(dir string) (*DevKeys, error) {
	path := filepath.Join(dir, "dev-signing-key.pem")
	var priv *rsa.PrivateKey
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		block, _ := pem.Decode(data)
		if block == nil {
			return nil, fmt.Errorf("dev signing key %s is not PEM", path)
		}
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("dev signing key %s: %w", path, err)
		}
		var ok bool
		if priv, ok = k.(*rsa.PrivateKey); !ok {
			return nil, fmt.Errorf("dev signing key %s is not RSA", path)
		}
	case errors.Is(err, os.ErrNotExist):
		if priv, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		switch err := createFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})); {
		case errors.Is(err, os.ErrExist):
			// Another process sharing the directory made it first: use theirs.
			return LoadDevKeys(dir)
		case err != nil:
			return nil, fmt.Errorf("write dev signing key: %w", err)
		}
	default:
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(pub)
	jwk := &clerk.JSONWebKey{Key: &priv.PublicKey, KeyID: "dev_" + base64.RawURLEncoding.EncodeToString(sum[:9]),
		Algorithm: string(jose.RS256), Use: "sig"}
	return &DevKeys{priv: priv, jwk: jwk}, nil
}

// Key returns the dev public key if kid names it.
func (d *DevKeys) Key(_ context.Context, kid string) (*clerk.JSONWebKey, error) {
	if kid != d.jwk.KeyID {
		return nil, fmt.Errorf("unknown kid %q", kid)
	}
	return d.jwk, nil
}

// Mint signs a session token for userID, valid for ttl, as Clerk would.
func (d *DevKeys) Mint(userID string, ttl time.Duration) (string, error) {
	opts := (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", d.jwk.KeyID)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: d.priv}, opts)
	if err != nil {
		return "", err
	}
	now := time.Now()
	claims := josejwt.Claims{
		Issuer:    DevIssuer,
		Subject:   userID,
		IssuedAt:  josejwt.NewNumericDate(now),
		NotBefore: josejwt.NewNumericDate(now.Add(-5 * time.Second)),
		Expiry:    josejwt.NewNumericDate(now.Add(ttl)),
	}
	return josejwt.Signed(signer).Claims(claims).CompactSerialize()
}

// createFileAtomic writes data to path only if path does not exist, and
// never leaves a half-written file there.
func createFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Link(tmp.Name(), path)
}

const ctxUserKey = "user_id"

// authenticate requires a valid session token and stores its user ID.
func (s *Server) authenticate(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		ip := "ip:" + ipBucket(c.RealIP())
		if err := s.authFailures.blocked(c, ip); err != nil {
			return err
		}
		h := c.Request().Header.Get(echo.HeaderAuthorization)
		scheme, token, _ := strings.Cut(h, " ")
		if !strings.EqualFold(scheme, "Bearer") || token == "" {
			s.authFailures.fail(ip)
			return errUnauthorized
		}
		userID, err := s.cfg.Verifier.Verify(c.Request().Context(), strings.TrimSpace(token))
		if err != nil {
			s.authFailures.fail(ip)
			// The reason is logged for the operator; the caller gets one answer.
			s.log.Debug("token refused", "request_id", requestID(c), "reason", err.Error())
			return errUnauthorized
		}
		c.Set(ctxUserKey, userID)
		return next(c)
	}
}

func userID(c echo.Context) string {
	id, _ := c.Get(ctxUserKey).(string)
	return id
}
