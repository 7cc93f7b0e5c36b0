package etcdtest_test

import (
	"context"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/distributedcompute/fleet/internal/etcdtest"
)

// Without Main, a test gets a server of its own that stops when it ends.
func TestStartOwnServer(t *testing.T) {
	var endpoint string
	t.Run("use", func(t *testing.T) {
		endpoint = etcdtest.Start(t)
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		key := etcdtest.Prefix(t) + "k"
		if _, err := cli.Put(ctx, key, "v"); err != nil {
			t.Fatal(err)
		}
		resp, err := cli.Get(ctx, key)
		if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v" {
			t.Fatalf("Get after Put = %v, %v", resp, err)
		}
	})
	if endpoint == "" {
		return // skipped or failed
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	// The subtest's cleanup stopped the server and waited for it to exit.
	if conn, err := net.Dial("tcp", u.Host); err == nil {
		conn.Close()
		t.Errorf("%s still takes connections after its test ended", endpoint)
	}
}

func TestPrefixesDoNotNest(t *testing.T) {
	a, b := etcdtest.Prefix(t), etcdtest.Prefix(t)
	if a == b || strings.HasPrefix(a, b) || strings.HasPrefix(b, a) {
		t.Errorf("prefixes %q and %q overlap", a, b)
	}
	if !strings.HasSuffix(a, "/") {
		t.Errorf("prefix %q does not end with /", a)
	}
}
