package fleet

import (
	"crypto/rand"
	"crypto/sha256"
	"hash/crc32"
	"strings"
)

// Host API keys are "hak_", 32 random base62 characters (190 bits) and a
// 6-character base62 CRC-32 of everything before it, so that a mistyped or
// made-up key is refused without a store lookup (the scheme of GitHub's tokens).
const (
	APIKeyPrefix      = "hak_"
	apiKeyRandomLen   = 32
	apiKeyChecksumLen = 6
	APIKeyLen         = len(APIKeyPrefix) + apiKeyRandomLen + apiKeyChecksumLen
	// APIKeyShownLen is how much of a key is kept in clear to tell keys apart.
	APIKeyShownLen = len(APIKeyPrefix) + 6
)

const base62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// APIKey is a freshly generated host API key. Raw is shown to the host once;
// only Hash is stored.
type APIKey struct {
	Raw    string
	Hash   []byte
	Prefix string
}

// NewAPIKey generates a key from crypto/rand.
func NewAPIKey() APIKey {
	var b strings.Builder
	b.Grow(APIKeyLen)
	b.WriteString(APIKeyPrefix)
	// Rejection sampling keeps every character uniform over the alphabet.
	buf := make([]byte, 64)
	for n := 0; n < apiKeyRandomLen; {
		_, _ = rand.Read(buf) // crypto/rand.Read never fails on supported platforms
		for _, c := range buf {
			if c >= 248 { // 248 = 4*62
				continue
			}
			b.WriteByte(base62[c%62])
			if n++; n == apiKeyRandomLen {
				break
			}
		}
	}
	b.WriteString(apiKeyChecksum(b.String()))
	raw := b.String()
	return APIKey{Raw: raw, Hash: HashAPIKey(raw), Prefix: raw[:APIKeyShownLen]}
}

// CheckAPIKey reports whether s has the shape and checksum of a host API key.
func CheckAPIKey(s string) bool {
	if len(s) != APIKeyLen || !strings.HasPrefix(s, APIKeyPrefix) {
		return false
	}
	for i := len(APIKeyPrefix); i < len(s); i++ {
		if strings.IndexByte(base62, s[i]) < 0 {
			return false
		}
	}
	body := s[:len(s)-apiKeyChecksumLen]
	return apiKeyChecksum(body) == s[len(body):]
}

// HashAPIKey returns the SHA-256 of a raw key, the only form that is stored.
func HashAPIKey(raw string) []byte {
	h := sha256.Sum256([]byte(raw))
	return h[:]
}

func apiKeyChecksum(body string) string {
	c := crc32.ChecksumIEEE([]byte(body))
	out := make([]byte, apiKeyChecksumLen)
	for i := apiKeyChecksumLen - 1; i >= 0; i-- {
		out[i] = base62[c%62]
		c /= 62
	}
	return string(out)
}
