package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// api is a REST client of the coordinator.
type api struct {
	base  string // http://host:port
	token string
	http  *http.Client
}

func newAPI(base string, conns int) *api {
	tr := &http.Transport{MaxIdleConns: conns, MaxIdleConnsPerHost: conns, IdleConnTimeout: time.Minute}
	return &api{base: strings.TrimRight(base, "/"), http: &http.Client{Transport: tr, Timeout: 60 * time.Second}}
}

// envelope is the coordinator's answer shape.
type envelope struct {
	Success bool            `json:"success"`
	Data    json.RawMessage `json:"data"`
	Error   *struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func (c *api) call(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var env envelope
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
		return fmt.Errorf("%s %s: HTTP %d, undecodable body: %w", method, path, resp.StatusCode, err)
	}
	if !env.Success {
		e := &httpError{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After"), msg: fmt.Sprintf("%s %s: HTTP %d", method, path, resp.StatusCode)}
		if env.Error != nil {
			e.msg += fmt.Sprintf(" %s: %s", env.Error.Code, env.Error.Message)
		}
		return e
	}
	if out != nil {
		return json.Unmarshal(env.Data, out)
	}
	return nil
}

// httpError is an error answer of the coordinator.
type httpError struct {
	status     int
	retryAfter string
	msg        string
}

func (e *httpError) Error() string { return e.msg }

// throttled returns how long to wait when err is a 429, and whether it is.
func throttled(err error) (time.Duration, bool) {
	var he *httpError
	if !errors.As(err, &he) || he.status != http.StatusTooManyRequests {
		return 0, false
	}
	if s, err := strconv.Atoi(he.retryAfter); err == nil && s > 0 {
		return time.Duration(s) * time.Second, true
	}
	return time.Second, true
}

// register creates n nodes, at most inFlight requests at a time, and
// returns their IDs and host API keys.
func (c *api) register(ctx context.Context, n, inFlight int) ([]nodeKey, error) {
	return registerVia(ctx, []*api{c}, n, inFlight)
}

// registerVia is register through several cluster members: node i through
// member i mod len(via), which becomes its agent's first member (Home).
func registerVia(ctx context.Context, via []*api, n, inFlight int) ([]nodeKey, error) {
	keys := make([]nodeKey, n)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next atomic.Int64
	var once sync.Once
	var firstErr error
	var wg sync.WaitGroup
	for range min(inFlight, n) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				body := map[string]any{
					"name": fmt.Sprintf("load-%06d", i), "region": "eu-west-1", "price_per_hour_cents": 50 + i%400,
					"specs": map[string]any{"gpu_model": "RTX 4090", "gpu_count": 1, "gpu_vram_gb": 24,
						"cpu_cores": 16, "ram_gb": 64, "disk_gb": 1000},
				}
				var out struct {
					Node struct {
						ID string `json:"id"`
					} `json:"node"`
					APIKey string `json:"api_key"`
				}
				c := via[i%len(via)]
				err := c.call(ctx, http.MethodPost, "/api/marketplace/nodes", body, &out)
				// A coordinator with its default rate limit throttles one
				// user's burst of registrations: wait as told.
				for wait, ok := throttled(err); ok && ctx.Err() == nil; wait, ok = throttled(err) {
					time.Sleep(wait)
					err = c.call(ctx, http.MethodPost, "/api/marketplace/nodes", body, &out)
				}
				if err != nil {
					once.Do(func() { firstErr = fmt.Errorf("register node %d: %w", i, err); cancel() })
					return
				}
				keys[i] = nodeKey{NodeID: out.Node.ID, Key: out.APIKey, Home: i % len(via)}
			}
		})
	}
	wg.Wait()
	return keys, firstErr
}

// nodeStatus returns a node's public status: online, offline or rented.
func (c *api) nodeStatus(ctx context.Context, id string) (string, error) {
	var v struct {
		Status string `json:"status"`
	}
	err := c.call(ctx, http.MethodGet, "/api/marketplace/nodes/"+id, nil, &v)
	return v.Status, err
}

// nodeConnection returns a node's public status and when its current
// connection began (zero when it has none).
func (c *api) nodeConnection(ctx context.Context, id string) (string, time.Time, error) {
	var v struct {
		Status         string     `json:"status"`
		ConnectedSince *time.Time `json:"connected_since"`
	}
	err := c.call(ctx, http.MethodGet, "/api/marketplace/nodes/"+id, nil, &v)
	if v.ConnectedSince == nil {
		return v.Status, time.Time{}, err
	}
	return v.Status, *v.ConnectedSince, err
}

// onlineNodes returns the marketplace statistics' online count.
func (c *api) onlineNodes(ctx context.Context) (int, error) {
	var v struct {
		Online int `json:"online_nodes"`
	}
	err := c.call(ctx, http.MethodGet, "/api/marketplace/stats", nil, &v)
	return v.Online, err
}

// goStats is what the coordinator's Prometheus endpoint says of its Go
// runtime: it shows where resident memory goes.
type goStats struct {
	OK          bool
	Goroutines  float64
	HeapInuse   float64
	StackInuse  float64
	GCSys       float64 // runtime metadata: GC bitmaps and the like
	HeapObjects float64
}

// goRuntime scrapes GET /metrics for the Go collector's figures. A
// coordinator without them gives a zero goStats.
func (c *api) goRuntime(ctx context.Context) goStats {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/metrics", nil)
	if err != nil {
		return goStats{}
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return goStats{}
	}
	defer resp.Body.Close()
	var g goStats
	fields := map[string]*float64{
		"go_goroutines":                 &g.Goroutines,
		"go_memstats_heap_inuse_bytes":  &g.HeapInuse,
		"go_memstats_stack_inuse_bytes": &g.StackInuse,
		"go_memstats_gc_sys_bytes":      &g.GCSys,
		"go_memstats_heap_objects":      &g.HeapObjects,
	}
	sc := bufio.NewScanner(resp.Body)
	seen := 0
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if dst, known := fields[name]; ok && known {
			if v, err := strconv.ParseFloat(strings.TrimSpace(val), 64); err == nil {
				*dst = v
				seen++
			}
		}
	}
	g.OK = seen == len(fields)
	return g
}

// waitReady polls path (/healthz, or /readyz for a cluster member) until
// the coordinator answers or ctx ends.
func (c *api) waitReady(ctx context.Context, path string) error {
	for {
		if err := c.call(ctx, http.MethodGet, path, nil, nil); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("coordinator at %s did not become healthy: %w", c.base, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// devToken mints a dev-mode session token with `coordinator dev-token`,
// or runs the operator's own command (through sh) when cmdline is set. env
// is the command's environment (DATA_DIR names the dev signing key).
func devToken(ctx context.Context, bin, cmdline, user string, env []string) (string, error) {
	var cmd *exec.Cmd
	if cmdline != "" {
		cmd = exec.CommandContext(ctx, "sh", "-c", cmdline)
	} else {
		cmd = exec.CommandContext(ctx, bin, "dev-token", "--user", user, "--ttl", "6h")
	}
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s: %w: %s", cmd, err, strings.TrimSpace(stderr.String()))
	}
	tok := strings.TrimSpace(string(out))
	if tok == "" {
		return "", fmt.Errorf("%s printed no token", cmd)
	}
	return tok, nil
}

// spawned is a process fleetload started itself: a coordinator in dev mode
// with a fresh data directory on a free port, a cluster member, or etcd.
type spawned struct {
	cmd     *exec.Cmd
	dir     string // removed when it stops; empty when another owns it
	env     []string
	url     string
	logPath string
	exited  chan struct{}
}

// spawnEnv is the coordinator's environment when fleetload starts it: dev
// auth, and a rate limit high enough that one user may register the whole
// fleet at once.
func spawnEnv(dir string, port int) []string {
	return append(os.Environ(),
		"PORT="+strconv.Itoa(port),
		"DATA_DIR="+filepath.Join(dir, "data"),
		"AUTH_MODE=dev",
		"RATE_LIMIT_RPS=100000",
		"RATE_LIMIT_BURST=100000",
		"LOG_LEVEL=warn",
	)
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// absBin resolves a relative binary path: the process runs in its own
// directory.
func absBin(bin string) (string, error) {
	if strings.ContainsRune(bin, filepath.Separator) {
		return filepath.Abs(bin)
	}
	return bin, nil
}

// startProcess starts bin with args in dir (its own directory, so that no
// .env file of the caller's applies), its output to logPath. Should
// fleetload die without stopping it, it stops too.
func startProcess(bin string, args []string, dir string, env []string, logPath string) (*spawned, error) {
	sp := &spawned{env: env, logPath: logPath, exited: make(chan struct{})}
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	sp.cmd = exec.Command(bin, args...)
	sp.cmd.Dir, sp.cmd.Env, sp.cmd.Stdout, sp.cmd.Stderr = dir, env, logf, logf
	sp.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := sp.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() { _ = sp.cmd.Wait(); logf.Close(); close(sp.exited) }()
	return sp, nil
}

func spawnCoordinator(ctx context.Context, bin string) (s *spawned, err error) {
	dir, err := os.MkdirTemp("", "fleetload-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if s == nil {
			_ = os.RemoveAll(dir)
		}
	}()
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	if bin, err = absBin(bin); err != nil {
		return nil, err
	}
	sp, err := startProcess(bin, []string{"serve"}, dir, spawnEnv(dir, port), filepath.Join(dir, "coordinator.log"))
	if err != nil {
		return nil, fmt.Errorf("start coordinator: %w", err)
	}
	sp.dir, sp.url = dir, fmt.Sprintf("http://127.0.0.1:%d", port)
	rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := newAPI(sp.url, 1).waitReady(rctx, "/healthz"); err != nil {
		err = fmt.Errorf("%w (log: %s)", err, sp.tail())
		sp.stop() // removes dir
		return nil, err
	}
	return sp, nil
}

// tail is the end of the process's log, for error messages.
func (s *spawned) tail() string {
	b, _ := os.ReadFile(s.logPath)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// stop ends the process (SIGTERM, then SIGKILL) and removes its data.
func (s *spawned) stop() {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(20 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}

// alive reports an error, with the end of its log, if the process has
// exited.
func (s *spawned) alive() error {
	select {
	case <-s.exited:
		return fmt.Errorf("%s exited: %s", filepath.Base(s.cmd.Path), s.tail())
	default:
		return nil
	}
}
