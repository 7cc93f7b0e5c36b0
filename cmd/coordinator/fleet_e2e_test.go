package main_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// agentProc is a running agent binary.
type agentProc struct {
	cmd    *exec.Cmd
	logs   *lockedBuffer
	exited chan struct{}
}

func startAgent(t *testing.T, c *coordinator, key string, extraEnv ...string) *agentProc {
	t.Helper()
	a := &agentProc{logs: &lockedBuffer{}, exited: make(chan struct{})}
	a.cmd = exec.Command(filepath.Join(binaries(t), "agent"))
	a.cmd.Dir = t.TempDir()
	a.cmd.Env = append(os.Environ(), "HOST_API_KEY="+key, "BACKEND_WS_URL=ws"+strings.TrimPrefix(c.url, "http")+"/fleet",
		"HEARTBEAT_INTERVAL=1s", "LOG_LEVEL=debug")
	a.cmd.Env = append(a.cmd.Env, extraEnv...)
	a.cmd.Stdout, a.cmd.Stderr = a.logs, a.logs
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = a.cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() {
		if a.cmd.ProcessState == nil {
			_ = a.cmd.Process.Kill()
			<-a.exited
		}
		if t.Failed() {
			t.Logf("agent logs:\n%s", a.logs.String())
		}
	})
	return a
}

type liveNode struct {
	Status         string     `json:"status"`
	LastSeenAt     *time.Time `json:"last_seen_at"`
	ConnectedSince *time.Time `json:"connected_since"`
	Metrics        *struct {
		MemoryTotalBytes uint64 `json:"memory_total_bytes"`
	} `json:"metrics"`
}

func (c *coordinator) node(id string) liveNode {
	c.t.Helper()
	var n liveNode
	if code := c.call("GET", "/api/marketplace/nodes/"+id, "", nil, &n); code != 200 {
		c.t.Fatalf("GET node: %d", code)
	}
	return n
}

// The host story: run the agent, see the node online; kill it, see it
// offline within the deadline; restart it; rotate the key and see the agent
// give up with its message.
func TestAgentOnlineOfflineRotate(t *testing.T) {
	const deadline = 5 * time.Second // the default HEARTBEAT_DEADLINE
	c := startCoordinator(t, t.TempDir())
	tok := c.token("user_host")
	var reg registered
	if code := c.call("POST", "/api/marketplace/nodes", tok, rigBody, &reg); code != 201 {
		t.Fatalf("register: %d", code)
	}
	id := reg.Node.ID

	agent := startAgent(t, c, reg.APIKey)
	eventually(t, 2*time.Second, "node online", func() bool { return c.node(id).Status == "online" })
	eventually(t, 5*time.Second, "metrics reported", func() bool {
		n := c.node(id)
		return n.Metrics != nil && n.Metrics.MemoryTotalBytes > 0 && n.ConnectedSince != nil
	})

	// SIGKILL: no close frame, the coordinator must notice by the deadline.
	if err := agent.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	<-agent.exited
	eventually(t, time.Until(killed.Add(deadline+250*time.Millisecond)), "node offline within deadline + 250ms", func() bool {
		return c.node(id).Status == "offline"
	})
	off := c.node(id)
	if off.LastSeenAt == nil || off.LastSeenAt.After(killed) || killed.Sub(*off.LastSeenAt) > 2*time.Second {
		t.Fatalf("last_seen_at %v is not the last heartbeat before the kill at %v", off.LastSeenAt, killed)
	}
	lastSeen := *off.LastSeenAt

	agent = startAgent(t, c, reg.APIKey)
	eventually(t, 5*time.Second, "node online again", func() bool { return c.node(id).Status == "online" })
	if n := c.node(id); !n.LastSeenAt.After(lastSeen) {
		t.Fatalf("last_seen_at did not move on after reconnecting")
	}

	var rotated registered
	if code := c.call("POST", "/api/marketplace/nodes/"+id+"/api-key", tok, nil, &rotated); code != 200 {
		t.Fatalf("rotate: %d", code)
	}
	select {
	case <-agent.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not exit after its key was rotated")
	}
	if code := agent.cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(agent.logs.String(), "revoked or rotated") {
		t.Fatalf("agent exit %d, logs:\n%s", code, agent.logs.String())
	}
	eventually(t, 2*time.Second, "node offline after rotation", func() bool { return c.node(id).Status == "offline" })

	// The old key is refused at the handshake; the new one works.
	old := startAgent(t, c, reg.APIKey)
	select {
	case <-old.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("agent with the old key did not give up")
	}
	if code := old.cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(old.logs.String(), "401") {
		t.Fatalf("old-key agent exit %d, logs:\n%s", code, old.logs.String())
	}
	startAgent(t, c, rotated.APIKey)
	eventually(t, 5*time.Second, "online with the new key", func() bool { return c.node(id).Status == "online" })
}
