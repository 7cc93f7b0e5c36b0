package main_test

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// etcdServer is a real etcd (Debian's etcd-server) that a test can stop and
// start again on the same data.
type etcdServer struct {
	t      *testing.T
	dir    string
	client string
	peer   string
	cmd    *exec.Cmd
	exited chan struct{}
}

func startEtcd(t *testing.T) *etcdServer {
	t.Helper()
	if _, err := exec.LookPath("etcd"); err != nil {
		t.Skip("etcd is not installed (apt-get install etcd-server): the cluster tests need a real etcd")
	}
	e := &etcdServer{t: t, dir: t.TempDir(),
		client: fmt.Sprintf("http://127.0.0.1:%d", freePort(t)), peer: fmt.Sprintf("http://127.0.0.1:%d", freePort(t))}
	e.start()
	t.Cleanup(e.stop)
	return e
}

func (e *etcdServer) start() {
	e.t.Helper()
	e.cmd = exec.Command("etcd", "--name", "default", "--data-dir", e.dir,
		"--listen-client-urls", e.client, "--advertise-client-urls", e.client,
		"--listen-peer-urls", e.peer, "--initial-advertise-peer-urls", e.peer,
		"--initial-cluster", "default="+e.peer)
	e.cmd.Env = append(os.Environ(), "ETCD_UNSUPPORTED_ARCH=")
	if err := e.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.exited = make(chan struct{})
	go func() { _ = e.cmd.Wait(); close(e.exited) }()
	eventually(e.t, 20*time.Second, "etcd healthy", func() bool {
		res, err := http.Get(e.client + "/health")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == 200
	})
}

func (e *etcdServer) stop() {
	if e.cmd.ProcessState == nil {
		_ = e.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-e.exited:
		case <-time.After(10 * time.Second):
			_ = e.cmd.Process.Kill()
			<-e.exited
		}
	}
}

// startMember starts a coordinator as a member of the cluster on etcd. The
// members share a data directory only for the dev signing key.
//
// Members run without the race detector: at the pinned version, protoactor's
// cluster reads its block list without the lock it writes it under
// (remote.BlockList.BlockedMembers against Block, from the gossip and the
// etcd watch), which the detector reports on any change of membership. The
// code of ours that clustering runs is raced by the tests of package actors.
func startMember(t *testing.T, etcd *etcdServer, dataDir string, extra ...string) *coordinator {
	t.Helper()
	env := append([]string{"CLUSTER=etcd", "ETCD_ENDPOINTS=" + etcd.client, "CLUSTER_NAME=test",
		"CLUSTER_ADVERTISE_HOST=127.0.0.1", fmt.Sprintf("CLUSTER_PORT=%d", freePort(t))}, extra...)
	return launch(t, dataDir, true, env...)
}

func wsURL(c *coordinator) string { return "ws" + strings.TrimPrefix(c.url, "http") + "/fleet" }

// Three coordinators on one etcd: agents spread over them, every member's
// REST API agrees, a rental started through A reaches an agent on C, and
// when C is killed its agents are back online through the others with no
// node or rental lost and no unreachable time billed.
func TestClusterOfThree(t *testing.T) {
	etcd := startEtcd(t)
	dataDir := t.TempDir()
	members := []*coordinator{startMember(t, etcd, dataDir), startMember(t, etcd, dataDir), startMember(t, etcd, dataDir)}
	a, b, c := members[0], members[1], members[2]
	host, renter := a.token("user_host"), a.token("user_renter")

	hookDir := t.TempDir()
	events := filepath.Join(hookDir, "events.jsonl")
	hook := filepath.Join(hookDir, "hook.sh")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\ncat >> "+events+"\necho >> "+events+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}

	// Six nodes, two agents on each member; each agent knows a second member
	// to fall back on.
	type placed struct {
		id    string
		agent *agentProc
		home  *coordinator
	}
	var nodes []placed
	for i := 0; i < 6; i++ {
		var reg registered
		if code := members[i%3].call("POST", "/api/marketplace/nodes", host, rigBody, &reg); code != 201 {
			t.Fatalf("register through member %d: %d", i%3, code)
		}
		home, fallback := members[i%3], members[(i+1)%3]
		ag := startAgent(t, home, reg.APIKey, "BACKEND_WS_URL="+wsURL(home)+","+wsURL(fallback), "RENTAL_HOOK="+hook)
		nodes = append(nodes, placed{reg.Node.ID, ag, home})
	}
	allOnline := func(via []*coordinator) func() bool {
		return func() bool {
			for _, m := range via {
				for _, n := range nodes {
					if m.node(n.id).Status == "offline" {
						return false
					}
				}
			}
			return true
		}
	}
	eventually(t, 10*time.Second, "every node online through every member", allOnline(members))

	// Node 2 is held by member C; rent it through member A.
	onC := nodes[2]
	if onC.home != c {
		t.Fatal("placement")
	}
	var r rentalState
	rentedAt := time.Now()
	if code := a.call("POST", "/api/billing/rentals", renter, map[string]any{"node_id": onC.id}, &r); code != 201 {
		t.Fatalf("rent through A: %d", code)
	}
	eventually(t, 10*time.Second, "rental.started reached the agent on C", func() bool {
		data, _ := os.ReadFile(events)
		return strings.Contains(string(data), r.ID)
	})
	eventually(t, 5*time.Second, "every member shows the node rented", func() bool {
		for _, m := range members {
			if m.node(onC.id).Status != "rented" {
				return false
			}
		}
		return true
	})

	// Kill C, and with it the machine of one of its nodes: that node must
	// stop showing online within the deadline + 1 s; the other agent of C
	// reconnects through its fallback.
	lost := nodes[5]
	_ = lost.agent.cmd.Process.Signal(syscall.SIGKILL)
	<-lost.agent.exited
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	killedAt := time.Now()
	<-c.exited
	eventually(t, time.Until(killedAt.Add(5*time.Second+time.Second)), "the lost node offline on A and B within deadline + 1 s", func() bool {
		return a.node(lost.id).Status == "offline" && b.node(lost.id).Status == "offline"
	})
	nodes = append(nodes[:5], nodes[6:]...)
	eventually(t, 10*time.Second, "C's other agent reconnected elsewhere", func() bool {
		return strings.Count(onC.agent.logs.String(), "msg=connected") >= 2
	})
	eventually(t, 10*time.Second, "the whole fleet online again on A and B", allOnline([]*coordinator{a, b}))
	t.Logf("fleet back online %s after the member was killed", time.Since(killedAt).Round(time.Millisecond))

	// Nothing lost: six nodes, one live rental, billed only while reachable.
	var listed []map[string]any
	if code := b.call("GET", "/api/marketplace/nodes?limit=200", "", nil, &listed); code != 200 || len(listed) != 6 { // the lost one too
		t.Fatalf("nodes after the loss: %d %d", code, len(listed))
	}
	get := func(m *coordinator) rentalState {
		var s rentalState
		if code := m.call("GET", "/api/billing/rentals/"+r.ID, renter, nil, &s); code != 200 {
			t.Fatalf("get rental: %d", code)
		}
		return s
	}
	eventually(t, 10*time.Second, "rental active again", func() bool { return get(b).Status == "active" })
	s := get(b)
	elapsed := time.Since(rentedAt)
	if s.BillableSeconds > int64(elapsed/time.Second) || s.CostCents != ceilCost(s.Price, s.BillableSeconds) {
		t.Fatalf("rental %+v after %s", s, elapsed)
	}
	if sa := get(a); sa.Status != s.Status {
		t.Fatalf("members disagree on the rental: %+v vs %+v", sa, s)
	}
	var stopped rentalState
	if code := a.call("POST", "/api/billing/rentals/"+r.ID+"/stop", renter, nil, &stopped); code != 200 || stopped.Status != "stopped" {
		t.Fatalf("stop: %d %+v", code, stopped)
	}
	eventually(t, 10*time.Second, "rental.stopped reached the agent", func() bool {
		data, _ := os.ReadFile(events)
		return strings.Contains(string(data), `"rental.stopped"`)
	})
}

// etcd stopped and started again under a running cluster: the members carry
// on serving, rejoin, and lose nothing.
func TestClusterSurvivesEtcdRestart(t *testing.T) {
	etcd := startEtcd(t)
	dataDir := t.TempDir()
	a, b := startMember(t, etcd, dataDir), startMember(t, etcd, dataDir)
	host := a.token("user_host")
	var reg registered
	if code := a.call("POST", "/api/marketplace/nodes", host, rigBody, &reg); code != 201 {
		t.Fatalf("register: %d", code)
	}
	startAgent(t, a, reg.APIKey, "BACKEND_WS_URL="+wsURL(a))
	eventually(t, 10*time.Second, "online through B", func() bool { return b.node(reg.Node.ID).Status == "online" })

	etcd.stop()
	// Past the members' etcd lease (3 s), so that they must register again.
	gone := time.Now()
	eventually(t, 20*time.Second, "etcd down for longer than a lease", func() bool { return time.Since(gone) > 5*time.Second })
	etcd.start()

	var reg2 registered
	eventually(t, 30*time.Second, "registration works again through B", func() bool {
		return b.call("POST", "/api/marketplace/nodes", host, rigBody, &reg2) == 201
	})
	startAgent(t, b, reg2.APIKey, "BACKEND_WS_URL="+wsURL(b))
	eventually(t, 20*time.Second, "both nodes online through both members", func() bool {
		for _, m := range []*coordinator{a, b} {
			for _, id := range []string{reg.Node.ID, reg2.Node.ID} {
				if m.node(id).Status != "online" {
					return false
				}
			}
		}
		return true
	})
	var r rentalState
	if code := a.call("POST", "/api/billing/rentals", a.token("user_renter"), map[string]any{"node_id": reg2.Node.ID}, &r); code != 201 {
		t.Fatalf("rent across members after the etcd restart: %d", code)
	}
	eventually(t, 10*time.Second, "rented everywhere", func() bool { return b.node(reg2.Node.ID).Status == "rented" && a.node(reg2.Node.ID).Status == "rented" })
}

// With etcd unreachable, a member refuses to start with one clear line
// within a bounded time instead of hanging in the upstream StartMember.
func TestClusterStartFailsWithoutEtcd(t *testing.T) {
	cmd := exec.Command(filepath.Join(binaries(t), "coordinator"), "serve")
	cmd.Env = append(os.Environ(), "AUTH_MODE=dev", "DATA_DIR="+t.TempDir(), fmt.Sprintf("PORT=%d", freePort(t)),
		"CLUSTER=etcd", fmt.Sprintf("ETCD_ENDPOINTS=http://127.0.0.1:%d", freePort(t)), fmt.Sprintf("CLUSTER_PORT=%d", freePort(t)))
	done := make(chan error, 1)
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 {
			t.Fatalf("exit %v", err)
		}
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("start-up hung with etcd unreachable")
	}
	if !strings.Contains(out.String(), "etcd") || !strings.Contains(out.String(), "coordinator:") {
		t.Fatalf("no clear message: %s", out.String())
	}
}

// A member that shuts down tells its agents to go elsewhere (1001) before
// it leaves; they reconnect through another member.
func TestClusterGracefulLeave(t *testing.T) {
	etcd := startEtcd(t)
	dataDir := t.TempDir()
	a, b := startMember(t, etcd, dataDir), startMember(t, etcd, dataDir)
	var reg registered
	if code := a.call("POST", "/api/marketplace/nodes", a.token("user_host"), rigBody, &reg); code != 201 {
		t.Fatalf("register: %d", code)
	}
	ag := startAgent(t, a, reg.APIKey, "BACKEND_WS_URL="+wsURL(a)+","+wsURL(b))
	eventually(t, 10*time.Second, "online through B", func() bool { return b.node(reg.Node.ID).Status == "online" })
	a.stop()
	eventually(t, 10*time.Second, "agent told 1001 and reconnected through B", func() bool {
		logs := ag.logs.String()
		return strings.Contains(logs, "1001") && strings.Count(logs, "msg=connected") >= 2
	})
	eventually(t, 5*time.Second, "online through B", func() bool { return b.node(reg.Node.ID).Status == "online" })
}

// One connection per node in the whole cluster: a second connection on
// another member replaces the first, which is closed with 4009.
func TestClusterSecondConnectionElsewhereReplacesFirst(t *testing.T) {
	etcd := startEtcd(t)
	dataDir := t.TempDir()
	a, b := startMember(t, etcd, dataDir), startMember(t, etcd, dataDir)
	var reg registered
	if code := a.call("POST", "/api/marketplace/nodes", a.token("user_host"), rigBody, &reg); code != 201 {
		t.Fatalf("register: %d", code)
	}
	dial := func(c *coordinator) *websocket.Conn {
		ws, _, err := websocket.DefaultDialer.Dial(wsURL(c), http.Header{"Authorization": {"Bearer " + reg.APIKey}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		var welcome map[string]any
		if err := ws.ReadJSON(&welcome); err != nil || welcome["event"] != "welcome" {
			t.Fatalf("welcome: %v %v", welcome, err)
		}
		return ws
	}
	first := dial(a)
	dial(b)
	_ = first.SetReadDeadline(time.Now().Add(15 * time.Second))
	for {
		_, _, err := first.ReadMessage()
		if err == nil {
			continue
		}
		if !websocket.IsCloseError(err, 4009) {
			t.Fatalf("first connection ended with %v, want close 4009", err)
		}
		break
	}
	eventually(t, 5*time.Second, "online through both members", func() bool {
		return a.node(reg.Node.ID).Status == "online" && b.node(reg.Node.ID).Status == "online"
	})
}
