package http

import (
	"fmt"
	"math"
	"strconv"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/labstack/echo/v4"
	"golang.org/x/time/rate"

	"github.com/distributedcompute/fleet"
)

// limiter is a token bucket per key (a user ID or a client IP). The buckets
// live in an LRU of bounded size, so memory stays bounded however many
// callers there are; a caller evicted from it merely starts with a full
// bucket again.
type limiter struct {
	name  string // policy name in the RateLimit headers
	rps   rate.Limit
	burst int

	mu      sync.Mutex
	buckets *lru.Cache[string, *rate.Limiter]
}

func newLimiter(name string, rps float64, burst, maxKeys int) *limiter {
	c, _ := lru.New[string, *rate.Limiter](maxKeys) // errors only for size <= 0, refused by config
	return &limiter{name: name, rps: rate.Limit(rps), burst: burst, buckets: c}
}

func (l *limiter) bucket(key string) *rate.Limiter {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.buckets.Get(key)
	if !ok {
		b = rate.NewLimiter(l.rps, l.burst)
		l.buckets.Add(key, b)
	}
	return b
}

// middleware limits requests by the key keyOf returns. It sets the IETF
// RateLimit-Policy and RateLimit headers (draft-ietf-httpapi-ratelimit-headers)
// on every answer, and answers 429 with Retry-After when the bucket is empty.
func (l *limiter) middleware(keyOf func(echo.Context) string) echo.MiddlewareFunc {
	// A bucket of burst tokens refilled at rps holds a quota of burst per
	// burst/rps seconds.
	window := int(math.Ceil(float64(l.burst) / float64(l.rps)))
	policy := fmt.Sprintf("%q;q=%d;w=%d", l.name, l.burst, window)
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			b := l.bucket(keyOf(c))
			now := time.Now()
			allowed := b.AllowN(now, 1)
			tokens := b.TokensAt(now)
			h := c.Response().Header()
			h.Set("RateLimit-Policy", policy)
			remaining := int(math.Max(0, math.Floor(tokens)))
			reset := int(math.Ceil((float64(l.burst) - tokens) / float64(l.rps)))
			h.Set("RateLimit", fmt.Sprintf("%q;r=%d;t=%d", l.name, remaining, reset))
			if !allowed {
				wait := int(math.Ceil((1 - tokens) / float64(l.rps)))
				h.Set("Retry-After", strconv.Itoa(max(wait, 1)))
				return fleet.Errorf(fleet.ERATELIMITED, "Too many requests; retry after %d s.", max(wait, 1))
			}
			return next(c)
		}
	}
}

// blocked limits what failures cost: a key (a client IP) whose bucket is
// empty is refused before any work, and each failure (fail) takes a token.
// Successful calls spend nothing, so an address is held back only while it
// keeps sending bad tokens, and then for every caller behind it.
func (l *limiter) blocked(c echo.Context, key string) error {
	b := l.bucket(key)
	now := time.Now()
	if tokens := b.TokensAt(now); tokens < 1 {
		wait := int(math.Ceil((1 - tokens) / float64(l.rps)))
		c.Response().Header().Set("Retry-After", strconv.Itoa(max(wait, 1)))
		return fleet.Errorf(fleet.ERATELIMITED, "Too many failed requests; retry after %d s.", max(wait, 1))
	}
	return nil
}

// fail takes a token from key's bucket.
func (l *limiter) fail(key string) { l.bucket(key).AllowN(time.Now(), 1) }
