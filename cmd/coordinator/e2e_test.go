package main_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// build is one set of binaries, built once per test run.
type build struct {
	once sync.Once
	dir  string
	err  error
	race bool
}

var (
	raceBuild  = &build{race: true}
	plainBuild = &build{}
)

func (b *build) get(t *testing.T) string {
	t.Helper()
	b.once.Do(func() {
		b.dir, b.err = os.MkdirTemp("", "fleet-bin-")
		if b.err != nil {
			return
		}
		for _, name := range []string{"coordinator", "agent"} {
			args := []string{"build", "-o", filepath.Join(b.dir, name)}
			if b.race {
				args = append(args, "-race")
			}
			out, err := exec.Command("go", append(args, "github.com/distributedcompute/fleet/cmd/"+name)...).CombinedOutput()
			if err != nil {
				b.err = fmt.Errorf("build %s: %v\n%s", name, err, out)
				return
			}
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.dir
}

// binaries are built with the race detector, so that the end-to-end tests
// check the real processes for races too.
func binaries(t *testing.T) string { return raceBuild.get(t) }

func TestMain(m *testing.M) {
	code := m.Run()
	for _, b := range []*build{raceBuild, plainBuild} {
		if b.dir != "" {
			os.RemoveAll(b.dir)
		}
	}
	os.Exit(code)
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// coordinator is a running coordinator process.
type coordinator struct {
	t       *testing.T
	cmd     *exec.Cmd
	url     string
	dataDir string
	port    int
	env     []string
	plain   bool // built without the race detector
	logs    *lockedBuffer
	exited  chan struct{}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startCoordinator starts the binary in dev mode on a free port and waits
// until /readyz answers.
func startCoordinator(t *testing.T, dataDir string, extraEnv ...string) *coordinator {
	t.Helper()
	return launch(t, dataDir, false, extraEnv...)
}

func launch(t *testing.T, dataDir string, plain bool, extraEnv ...string) *coordinator {
	t.Helper()
	port := freePort(t)
	c := &coordinator{t: t, dataDir: dataDir, port: port, url: fmt.Sprintf("http://127.0.0.1:%d", port), logs: &lockedBuffer{}, plain: plain}
	c.env = append(os.Environ(), "AUTH_MODE=dev", "DATA_DIR="+dataDir, fmt.Sprintf("PORT=%d", port), "LOG_LEVEL=debug",
		"RATE_LIMIT_RPS=1000", "RATE_LIMIT_BURST=1000") // the tests poll fast
	c.env = append(c.env, extraEnv...)
	c.start()
	return c
}

func (c *coordinator) start() {
	c.t.Helper()
	bin := binaries(c.t)
	if c.plain {
		bin = plainBuild.get(c.t)
	}
	c.cmd = exec.Command(filepath.Join(bin, "coordinator"), "serve")
	c.cmd.Env = c.env
	c.cmd.Stdout, c.cmd.Stderr = c.logs, c.logs
	if err := c.cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	c.exited = make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(c.exited) }()
	c.t.Cleanup(c.kill)
	eventually(c.t, 30*time.Second, "coordinator ready", func() bool {
		select {
		case <-c.exited:
			c.t.Fatalf("coordinator exited while starting: %v\n%s", c.cmd.ProcessState, c.logs.String())
		default:
		}
		res, err := http.Get(c.url + "/readyz")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == 200
	})
}

func (c *coordinator) kill() {
	if c.cmd.ProcessState == nil {
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
	if c.t.Failed() {
		c.t.Logf("coordinator logs:\n%s", c.logs.String())
	}
}

// stop sends SIGTERM and waits for a clean exit.
func (c *coordinator) stop() {
	c.t.Helper()
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(20 * time.Second):
		c.t.Fatal("coordinator did not stop on SIGTERM")
	}
	if code := c.cmd.ProcessState.ExitCode(); code != 0 {
		c.t.Fatalf("coordinator exited %d", code)
	}
}

func (c *coordinator) restart() {
	c.t.Helper()
	c.stop()
	c.start()
}

// token mints a dev token with the binary's dev-token command.
func (c *coordinator) token(user string) string {
	c.t.Helper()
	cmd := exec.Command(filepath.Join(binaries(c.t), "coordinator"), "dev-token", "--user", user, "--ttl", "1h")
	cmd.Env = c.env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		c.t.Fatalf("dev-token: %v: %s", err, stderr.String())
	}
	tok := strings.TrimSpace(string(out))
	if strings.Count(tok, ".") != 2 || strings.ContainsAny(tok, " \n") {
		c.t.Fatalf("dev-token printed %q, want only a JWT", out)
	}
	return tok
}

// call does one request and decodes the envelope's data into out.
func (c *coordinator) call(method, path, token string, body any, out any) int {
	c.t.Helper()
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, c.url+path, r)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	var env struct {
		Data json.RawMessage `json:"data"`
	}
	raw, _ := io.ReadAll(res.Body)
	if out != nil && res.StatusCode < 300 {
		if err := json.Unmarshal(raw, &env); err != nil {
			c.t.Fatalf("%s %s: %v: %s", method, path, err, raw)
		}
		if err := json.Unmarshal(env.Data, out); err != nil {
			c.t.Fatalf("%s %s: %v: %s", method, path, err, raw)
		}
	}
	return res.StatusCode
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type registered struct {
	Node struct {
		ID     string `json:"id"`
		Name   string `json:"name"`
		Status string `json:"status"`
	} `json:"node"`
	APIKey string `json:"api_key"`
}

var rigBody = map[string]any{
	"name": "rig-1", "region": "eu-west-1", "price_per_hour_cents": 120,
	"specs": map[string]any{"gpu_model": "RTX 4090", "gpu_count": 1, "gpu_vram_gb": 24, "cpu_cores": 16, "ram_gb": 64, "disk_gb": 1000},
}

// The register-a-node story with the real binary: mint a token, register,
// restart, find the node again.
func TestRegisterSurvivesRestart(t *testing.T) {
	c := startCoordinator(t, t.TempDir())
	tok := c.token("user_host")
	var reg registered
	if code := c.call("POST", "/api/marketplace/nodes", tok, rigBody, &reg); code != 201 {
		t.Fatalf("register: %d", code)
	}
	c.restart()
	var node struct {
		ID, Name, Status string
	}
	if code := c.call("GET", "/api/marketplace/nodes/"+reg.Node.ID, "", nil, &node); code != 200 || node.Name != "rig-1" || node.Status != "offline" {
		t.Fatalf("after restart: %d %+v", code, node)
	}
	// The token minted before the restart still verifies: the dev key is kept.
	var mine []map[string]any
	if code := c.call("GET", "/api/marketplace/my-nodes", tok, nil, &mine); code != 200 || len(mine) != 1 {
		t.Fatalf("my-nodes after restart: %d %v", code, mine)
	}
	if strings.Contains(c.logs.String(), reg.APIKey[10:]) || strings.Contains(c.logs.String(), tok) {
		t.Fatal("a key or token appears in the logs")
	}
}

// serve refuses clerk mode without keys, with one line naming the setting.
func TestServeRefusesClerkModeWithoutKeys(t *testing.T) {
	cases := map[string][]string{
		"CLERK_SECRET_KEY":      {"AUTH_MODE=clerk", "CLERK_SECRET_KEY=", "CLERK_PUBLISHABLE_KEY="},
		"CLERK_PUBLISHABLE_KEY": {"AUTH_MODE=clerk", "CLERK_SECRET_KEY=sk_test_x", "CLERK_PUBLISHABLE_KEY="},
		"PORT":                  {"AUTH_MODE=dev", "PORT=http"},
		"AUTH_MODE":             {"AUTH_MODE=none"},
	}
	for setting, env := range cases {
		t.Run(setting, func(t *testing.T) {
			cmd := exec.Command(filepath.Join(binaries(t), "coordinator"), "serve")
			cmd.Dir = t.TempDir()
			cmd.Env = append(append(os.Environ(), "DATA_DIR="+t.TempDir(), "CLERK_ISSUER="), env...)
			out, err := cmd.CombinedOutput()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
				t.Fatalf("exit: %v, output %s", err, out)
			}
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], setting) {
				t.Fatalf("want one line naming %s, got %q", setting, out)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	out, err := exec.Command(filepath.Join(binaries(t), "coordinator"), "version").Output()
	if err != nil || !strings.HasPrefix(string(out), "coordinator ") {
		t.Fatalf("version: %v %q", err, out)
	}
}
