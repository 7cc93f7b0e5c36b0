// Package etcdtest runs a real etcd server for the tests of packages that
// keep records in etcd. It needs the etcd binary on PATH (Debian's
// etcd-server package); without it, tests that ask for a server are
// skipped.
//
// A package whose tests share one server calls Main from TestMain:
//
//	func TestMain(m *testing.M) { etcdtest.Main(m) }
//
// and gives each test a key prefix of its own with Prefix, so that tests
// do not see each other's keys.
package etcdtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// StartTimeout bounds how long a server may take to answer after it starts.
const StartTimeout = 30 * time.Second

// startAttempts is how often a server is started before giving up: the free
// ports are found before etcd binds them, and another process may take one
// in between.
const startAttempts = 3

var shared struct {
	mu      sync.Mutex
	enabled bool // Main is running the tests
	srv     *server
	err     error
}

// Main runs the package's tests and then stops the server they shared. Call
// it from TestMain; the test binary exits with the tests' result when
// TestMain returns.
func Main(m *testing.M) {
	shared.mu.Lock()
	shared.enabled = true
	shared.mu.Unlock()
	defer func() {
		shared.mu.Lock()
		defer shared.mu.Unlock()
		if shared.srv != nil {
			shared.srv.stop()
			_ = os.RemoveAll(shared.srv.dir)
			shared.srv = nil
		}
	}()
	m.Run()
}

// Start returns the client URL of a running etcd server, such as
// "http://127.0.0.1:43127". Under Main the package's tests share one server,
// started by the first test that asks; otherwise t gets a server of its own,
// stopped when t ends. t is skipped when no etcd is on PATH.
func Start(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Skip("etcd is not on PATH (on Debian: apt-get install etcd-server); skipping a test that needs a real etcd server")
	}
	shared.mu.Lock()
	if shared.enabled {
		defer shared.mu.Unlock()
		if shared.srv == nil && shared.err == nil {
			dir, err := os.MkdirTemp("", "etcdtest-")
			if err != nil {
				shared.err = err
			} else if shared.srv, shared.err = start(bin, dir); shared.err != nil {
				_ = os.RemoveAll(dir)
			}
		}
		if shared.err != nil {
			t.Fatalf("etcdtest: %v", shared.err)
		}
		return shared.srv.url
	}
	shared.mu.Unlock()
	dir := t.TempDir() // removed after the server stops: cleanups run last first
	srv, err := start(bin, dir)
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	t.Cleanup(srv.stop)
	return srv.url
}

var prefixes atomic.Int64

var unsafeInKey = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// Prefix returns a key prefix that no other call in this process returns,
// such as "/etcdtest/7/TestStore_Update/": no such prefix extends another.
func Prefix(t testing.TB) string {
	return fmt.Sprintf("/etcdtest/%d/%s/", prefixes.Add(1), unsafeInKey.ReplaceAllString(t.Name(), "_"))
}

// server is one etcd process.
type server struct {
	url    string
	dir    string
	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has exited
	log    *tail
}

func (s *server) stop() {
	_ = s.cmd.Process.Kill()
	<-s.exited
}

// start runs etcd with its data in dir and waits until it answers.
func start(bin, dir string) (*server, error) {
	var err error
	for range startAttempts {
		var srv *server
		if srv, err = startOnce(bin, dir); err == nil {
			return srv, nil
		}
		if err := os.RemoveAll(dir); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
	}
	return nil, err
}

func startOnce(bin, dir string) (*server, error) {
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	client := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peer := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	cmd := exec.Command(bin,
		"--name", "default",
		"--data-dir", dir,
		"--listen-client-urls", client,
		"--advertise-client-urls", client,
		"--listen-peer-urls", peer,
		"--initial-advertise-peer-urls", peer,
		"--initial-cluster", "default="+peer,
		"--logger", "zap",
		"--log-outputs", "stderr",
		"--log-level", "warn",
	)
	cmd.Env = environ()
	log := &tail{max: 8 << 10}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	srv := &server{url: client, dir: dir, cmd: cmd, exited: make(chan struct{}), log: log}
	go func() {
		_ = cmd.Wait()
		close(srv.exited)
	}()
	if err := srv.waitReady(ports[0]); err != nil {
		srv.stop()
		return nil, fmt.Errorf("etcd at %s: %w; its output ends:\n%s", client, err, log.String())
	}
	return srv, nil
}

// waitReady waits until the server takes connections and then answers a
// read, or fails when it exits or StartTimeout passes.
func (s *server) waitReady(port int) error {
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	go func() {
		select {
		case <-s.exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	// Poll the port first: the client backs off for a second or more after
	// a refused connection, which would slow every start.
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			_ = conn.Close()
			break
		}
		select {
		case <-ctx.Done():
			return s.startErr(ctx)
		case <-tick.C:
		}
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{s.url}, DialTimeout: StartTimeout, Logger: zap.NewNop()})
	if err != nil {
		return err
	}
	defer cli.Close()
	// The client waits for the connection and retries while the server
	// is not ready yet.
	if _, err := cli.Get(ctx, "etcdtest-ready"); err != nil {
		if ctx.Err() != nil {
			return s.startErr(ctx)
		}
		return err
	}
	return nil
}

func (s *server) startErr(ctx context.Context) error {
	select {
	case <-s.exited:
		return fmt.Errorf("exited during start-up: %v", s.cmd.ProcessState)
	default:
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("no answer within %v", StartTimeout)
	}
	return ctx.Err()
}

// freePorts returns n loopback ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close() // held until all are chosen, so they differ
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// environ is this process's environment without etcd's own settings, which
// would override the flags of a test server.
func environ() []string {
	var env []string
	arch := false
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "ETCD_UNSUPPORTED_ARCH=") {
			arch = true
		} else if strings.HasPrefix(kv, "ETCD_") {
			continue
		}
		env = append(env, kv)
	}
	// etcd 3.4 starts on amd64 and ppc64le only unless told otherwise.
	if !arch && runtime.GOARCH != "amd64" && runtime.GOARCH != "ppc64le" {
		env = append(env, "ETCD_UNSUPPORTED_ARCH="+runtime.GOARCH)
	}
	return env
}

// tail keeps the last max bytes written to it.
type tail struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = bytes.Clone(t.buf[over:])
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}
