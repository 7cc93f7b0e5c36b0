package main

// Cluster mode (-spawn-cluster N): fleetload starts a real etcd on free
// loopback ports and N coordinators as one cluster on it, registers the
// fleet through the members in turn and spreads the agents over them (agent
// i starts on member i mod N and, like the real agent given a list of
// members, moves on to the next one in turn when its connection ends). It
// measures each member as the single mode measures the one coordinator,
// checks that the members agree, then SIGKILLs one member and times the
// fleet's failover.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/distributedcompute/fleet"
)

// clusterName is the members' CLUSTER_NAME; the etcd is fleetload's own.
const clusterName = "fleetload"

// failoverPoll is how often the fleet is checked after the kill.
const failoverPoll = 100 * time.Millisecond

// movedSample is how many of the killed member's agents are followed
// through every survivor until it shows their new connection.
const movedSample = 30

// cluster is the etcd and the coordinators fleetload started.
type cluster struct {
	dir         string // temporary: etcd's data, the members' shared DATA_DIR, logs
	etcd        *spawned
	etcdVersion string
	members     []*spawned
	apis        []*api
	killed      int // the member killed on purpose, -1 until then
}

// freePorts returns n distinct loopback ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// startCluster starts etcd, then the members one by one, each when the one
// before answers /readyz.
func startCluster(ctx context.Context, o *options) (cl *cluster, err error) {
	dir, err := os.MkdirTemp("", "fleetload-cluster-")
	if err != nil {
		return nil, err
	}
	cl = &cluster{dir: dir, killed: -1}
	defer func() {
		if err != nil {
			cl.stop()
			cl = nil
		}
	}()
	n := o.spawnCluster
	ports, err := freePorts(2 + 2*n) // etcd client and peer, each member's REST and cluster ports
	if err != nil {
		return cl, err
	}
	if err := cl.startEtcd(ctx, o.etcdBin, ports[0], ports[1]); err != nil {
		return cl, err
	}
	bin, err := absBin(o.coordinatorBin)
	if err != nil {
		return cl, err
	}
	for i := range n {
		port, cport := ports[2+2*i], ports[3+2*i]
		mdir := filepath.Join(dir, fmt.Sprintf("member-%d", i))
		if err := os.MkdirAll(mdir, 0o755); err != nil {
			return cl, err
		}
		// spawnEnv's DATA_DIR is dir/data: shared by the members, for the
		// dev signing key only (the store is etcd).
		env := append(spawnEnv(dir, port),
			"CLUSTER=etcd",
			"ETCD_ENDPOINTS="+cl.etcd.url,
			"CLUSTER_NAME="+clusterName,
			"CLUSTER_ADVERTISE_HOST=127.0.0.1",
			"CLUSTER_PORT="+strconv.Itoa(cport),
		)
		m, err := startProcess(bin, []string{"serve"}, mdir, env, filepath.Join(mdir, "coordinator.log"))
		if err != nil {
			return cl, fmt.Errorf("start member %d: %w", i, err)
		}
		m.url = fmt.Sprintf("http://127.0.0.1:%d", port)
		cl.members = append(cl.members, m)
		cl.apis = append(cl.apis, newAPI(m.url, 64))
		rctx, cancel := context.WithTimeout(ctx, 45*time.Second)
		err = newAPI(m.url, 1).waitReady(rctx, "/readyz")
		cancel()
		if err != nil {
			return cl, fmt.Errorf("member %d: %w (log: %s)", i, err, m.tail())
		}
		logf("member %d ready: pid %d at %s", i, m.cmd.Process.Pid, m.url)
	}
	return cl, nil
}

func (cl *cluster) startEtcd(ctx context.Context, bin string, client, peer int) error {
	edir := filepath.Join(cl.dir, "etcd")
	if err := os.MkdirAll(edir, 0o755); err != nil {
		return err
	}
	cu, pu := fmt.Sprintf("http://127.0.0.1:%d", client), fmt.Sprintf("http://127.0.0.1:%d", peer)
	bin, err := absBin(bin)
	if err != nil {
		return err
	}
	e, err := startProcess(bin, []string{"--name", "fleetload", "--data-dir", filepath.Join(edir, "data"),
		"--listen-client-urls", cu, "--advertise-client-urls", cu,
		"--listen-peer-urls", pu, "--initial-advertise-peer-urls", pu,
		"--initial-cluster", "fleetload=" + pu}, edir, os.Environ(), filepath.Join(edir, "etcd.log"))
	if err != nil {
		return fmt.Errorf("start etcd (-etcd-bin; Debian: apt-get install etcd-server): %w", err)
	}
	e.url = cu
	cl.etcd = e
	hc := &http.Client{Timeout: 2 * time.Second}
	for deadline := time.Now().Add(20 * time.Second); ; {
		if res, err := hc.Get(cu + "/health"); err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				break
			}
		}
		if err := e.alive(); err != nil {
			return err
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("etcd at %s did not become healthy (log: %s)", cu, e.tail())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if res, err := hc.Get(cu + "/version"); err == nil {
		var v struct {
			Server string `json:"etcdserver"`
		}
		_ = json.NewDecoder(res.Body).Decode(&v)
		res.Body.Close()
		cl.etcdVersion = v.Server
	}
	logf("etcd %s ready: pid %d at %s", cl.etcdVersion, e.cmd.Process.Pid, cu)
	return nil
}

// stop ends the members (all at once), then etcd, and removes their data.
func (cl *cluster) stop() {
	var wg sync.WaitGroup
	for _, m := range cl.members {
		wg.Go(m.stop)
	}
	wg.Wait()
	if cl.etcd != nil {
		cl.etcd.stop()
	}
	_ = os.RemoveAll(cl.dir)
}

// alive reports the processes that exited, but for the member killed on
// purpose.
func (cl *cluster) alive() error {
	var errs []error
	if cl.etcd != nil {
		errs = append(errs, cl.etcd.alive())
	}
	for i, m := range cl.members {
		if i != cl.killed {
			if err := m.alive(); err != nil {
				errs = append(errs, fmt.Errorf("member %d: %w", i, err))
			}
		}
	}
	return errors.Join(errs...)
}

// etcdFigures are the counters of etcd's /metrics that fleetload reports.
var etcdFigures = []string{
	"etcd_server_proposals_committed_total", // writes through raft
	"etcd_mvcc_txn_total",
	"etcd_mvcc_put_total",
	"etcd_mvcc_range_total",
	"etcd_disk_wal_fsync_duration_seconds_count",
	"etcd_network_client_grpc_received_bytes_total",
	"etcd_network_client_grpc_sent_bytes_total",
	"etcd_debugging_mvcc_keys_total",
	"etcd_mvcc_db_total_size_in_bytes",
}

type promValues map[string]float64

// etcdMetrics scrapes etcd's /metrics; a failed scrape gives nil.
func (cl *cluster) etcdMetrics(ctx context.Context) promValues {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cl.etcd.url+"/metrics", nil)
	if err != nil {
		return nil
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil
	}
	defer res.Body.Close()
	return parseProm(res.Body, etcdFigures)
}

// parseProm picks the named unlabelled samples out of a Prometheus text
// exposition.
func parseProm(r io.Reader, names []string) promValues {
	out := promValues{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || !slices.Contains(names, name) {
			continue
		}
		if v, err := strconv.ParseFloat(strings.TrimSpace(val), 64); err == nil {
			out[name] = v
		}
	}
	return out
}

func (p promValues) delta(q promValues, name string) float64 { return q[name] - p[name] }

// procIO is a process's read and written bytes from /proc/PID/io: every
// read and write system call, sockets included.
type procIO struct{ RChar, WChar uint64 }

func parseProcIO(data string) (procIO, error) {
	var p procIO
	seen := 0
	for line := range strings.Lines(data) {
		name, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		var dst *uint64
		switch name {
		case "rchar":
			dst = &p.RChar
		case "wchar":
			dst = &p.WChar
		default:
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return procIO{}, fmt.Errorf("/proc io: %s: %w", name, err)
		}
		*dst = n
		seen++
	}
	if seen != 2 {
		return procIO{}, errors.New("/proc io: no rchar and wchar")
	}
	return p, nil
}

func readProcIO(pid int) (procIO, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return procIO{}, err
	}
	return parseProcIO(string(data))
}

// clusterReport is everything a cluster run measured: the single mode's
// figures cluster-wide, and per member.
type clusterReport struct {
	report
	cl        *cluster
	startTime time.Duration
	pids      []int

	base, from, to   []sample // each member: after registration, at the window's ends
	ioFrom, ioTo     []procIO
	ioOK             bool
	agentsAt         []int // each member's agents when the window opened
	etcdFrom, etcdTo sample
	etcdMFrom        promValues
	etcdMTo          promValues
	etcdConnFrom     promValues // around the connect phase
	etcdConnTo       promValues

	logs []logCount // the members' log lines (warn and above), by message

	onlineVia []int // stats online_nodes through each member after the window
	onlineErr []error
	consist   consistency
	fail      *failover
}

// consistency is what the members said of a sample of nodes.
type consistency struct {
	nodes, answers, online, agree, errors int
	diffs                                 []string // a few nodes the members disagree on
}

// failover is what the kill of a member measured. Durations are from the
// kill to the end of the poll that saw the condition (upper bounds, polls
// failoverPoll apart); -1 if never seen.
type failover struct {
	killed         int
	pid            int
	killedAt       time.Time
	agentsOnKilled int
	lost           []string // nodes whose agents were stopped with the member
	expected       int      // agents meant to be online after it
	survivors      []int

	allReconnected time.Duration // no agent down, none on the killed member
	statsExact     time.Duration // online_nodes == expected through every survivor, first
	statsStable    time.Duration // ... and from then on until polling ended
	fleetOnline    time.Duration // both at once, first
	relapses       int           // polls after fleetOnline where it no longer held
	minOnline      int
	maxOnline      int
	polled         time.Duration
	timedOut       bool
	reconnected    int
	reconnectAfter *histogram
	perMemberAfter []int

	lostOffline *histogram // per lost node and survivor: kill -> first "offline"
	lostMissed  int
	// A sample of the agents that move: per node and survivor, kill -> first
	// answer online with a connection that began after the kill.
	moved       int
	movedSeen   *histogram
	movedMissed int

	cpuFrom, cpuTo   []sample // survivors, at the kill and when the fleet was online
	etcdFrom, etcdTo promValues
	costWindow       time.Duration
}

func runCluster(ctx context.Context, o *options) (*clusterReport, error) {
	r := &clusterReport{report: report{o: o, command: strings.Join(os.Args, " "), machine: machine(), hz: clockTicks()}}
	n := o.spawnCluster
	logf("starting etcd and %d coordinators", n)
	t0 := time.Now()
	cl, err := startCluster(ctx, o)
	if err != nil {
		return nil, err
	}
	defer cl.stop()
	r.cl, r.startTime = cl, time.Since(t0)
	for _, m := range cl.members {
		r.pids = append(r.pids, m.cmd.Process.Pid)
	}

	tok := o.token
	if tok == "" {
		if tok, err = devToken(ctx, o.coordinatorBin, o.devTokenCmd, o.user, cl.members[0].env); err != nil {
			return nil, fmt.Errorf("getting a token: %w", err)
		}
	}
	for _, c := range cl.apis {
		c.token = tok
	}

	logf("registering %d nodes through %d members in turn (%d in flight)", o.agents, n, o.registerInFlight)
	t0 = time.Now()
	keys, err := registerVia(ctx, cl.apis, o.agents, o.registerInFlight)
	if err != nil {
		return nil, errors.Join(err, cl.alive())
	}
	r.registered, r.registerTime = len(keys), time.Since(t0)
	for _, c := range cl.apis {
		c.http.CloseIdleConnections()
	}
	logf("registered %d nodes in %s", len(keys), r.registerTime.Round(time.Millisecond))

	time.Sleep(time.Second) // let the registration burst's garbage settle
	r.haveCoord = true
	r.base = make([]sample, n)
	for i, pid := range r.pids {
		if r.base[i], err = (&sampler{pid: pid}).read(); err != nil {
			return nil, fmt.Errorf("reading member %d's baseline: %w", i, err)
		}
	}

	urls := make([]string, n)
	for i, m := range cl.members {
		urls[i] = wsURL(m.url)
	}
	pools, err := startPools(o, urls, true, keys)
	if err != nil {
		return nil, err
	}
	r.workers = len(pools)
	finished := false
	defer func() {
		if !finished {
			_ = eachPool(pools, func(p pool) error { _, err := p.finish(time.Time{}, -1); return err })
		}
	}()

	r.etcdConnFrom = cl.etcdMetrics(ctx)
	if err := r.connect(o, pools); err != nil {
		return nil, errors.Join(err, cl.alive())
	}
	r.etcdConnTo = cl.etcdMetrics(ctx)
	if err := sleep(ctx, o.interval+500*time.Millisecond); err != nil {
		return nil, err
	}
	if err := r.measure(ctx, o, pools); err != nil {
		return nil, errors.Join(err, cl.alive())
	}

	logf("reading %d nodes and the statistics through every member", min(o.consistencySample, len(keys)))
	r.checkConsistency(ctx, keys)
	r.onlineVia, r.onlineErr = make([]int, n), make([]error, n)
	for i, c := range cl.apis {
		r.onlineVia[i], r.onlineErr[i] = c.onlineNodes(ctx)
	}

	since, killed := time.Time{}, -1
	if o.killMember >= 0 {
		if err := r.failover(ctx, o, pools, keys); err != nil {
			return nil, errors.Join(err, cl.alive())
		}
		since, killed = r.fail.killedAt, r.fail.killed
	}
	finished = true
	err = r.finish(pools, since, killed)
	r.logs = cl.logSummary()
	return r, err
}

// logCount is how many lines of the members' logs carry one message.
type logCount struct {
	Msg     string
	N       int
	Members []int
}

// logSummary counts the members' log lines by message (they log at warn
// and above), most frequent first.
func (cl *cluster) logSummary() []logCount {
	by := map[string]*logCount{}
	for i, m := range cl.members {
		data, err := os.ReadFile(m.logPath)
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(data)) {
			msg := logMsg(line)
			if msg == "" {
				continue
			}
			c := by[msg]
			if c == nil {
				c = &logCount{Msg: msg}
				by[msg] = c
			}
			c.N++
			if !slices.Contains(c.Members, i) {
				c.Members = append(c.Members, i)
			}
		}
	}
	out := make([]logCount, 0, len(by))
	for _, c := range by {
		out = append(out, *c)
	}
	slices.SortFunc(out, func(a, b logCount) int { return b.N - a.N })
	return out
}

// logMsg is the msg of a slog text line (msg="..." or msg=word), or the
// line's start when it is not one.
func logMsg(line string) string {
	line = strings.TrimSpace(line)
	_, rest, ok := strings.Cut(line, " msg=")
	if !ok {
		if len(line) > 80 {
			line = line[:80]
		}
		return line
	}
	if strings.HasPrefix(rest, `"`) {
		if v, err := strconv.QuotedPrefix(rest); err == nil {
			if u, err := strconv.Unquote(v); err == nil {
				return u
			}
		}
	}
	msg, _, _ := strings.Cut(rest, " ")
	return msg
}

// statusAll merges the status of every pool.
func statusAll(pools []pool, since time.Time, members int) (statusResult, error) {
	sum := statusResult{PerMember: make([]int, members)}
	after := newHistogram()
	var mu sync.Mutex
	err := eachPool(pools, func(p pool) error {
		st, err := p.status(since)
		mu.Lock()
		defer mu.Unlock()
		sum.Up += st.Up
		sum.Down += st.Down
		sum.Reconnected += st.Reconnected
		for i, c := range st.PerMember {
			if i < len(sum.PerMember) {
				sum.PerMember[i] += c
			}
		}
		after.merge(st.ReconnectAfter.histogram())
		return err
	})
	sum.ReconnectAfter = after.wire()
	return sum, err
}

// measure runs the measurement window: every member's CPU, memory and I/O
// and etcd's at both ends, and the acks every pool saw in between.
func (r *clusterReport) measure(ctx context.Context, o *options, pools []pool) error {
	n := len(r.pids)
	st, err := statusAll(pools, time.Time{}, n)
	if err != nil {
		return err
	}
	r.agentsAt = st.PerMember
	genPIDs := generatorPIDs(pools)
	genFrom := processCPU(genPIDs)
	etcd := &sampler{pid: r.cl.etcd.cmd.Process.Pid}
	read := func(at *[]sample, io *[]procIO, m *promValues, e *sample) error {
		*at, *io = make([]sample, n), make([]procIO, n)
		for i, pid := range r.pids {
			s, err := (&sampler{pid: pid}).read()
			if err != nil {
				return fmt.Errorf("reading member %d: %w", i, err)
			}
			(*at)[i] = s
			if (*io)[i], err = readProcIO(pid); err != nil {
				r.ioOK = false
			}
		}
		var err error
		if *e, err = etcd.read(); err != nil {
			return fmt.Errorf("reading etcd: %w", err)
		}
		*m = r.cl.etcdMetrics(ctx)
		return nil
	}
	r.ioOK = true
	if err := eachPool(pools, func(p pool) error { return p.open() }); err != nil {
		return err
	}
	if r.report.from, err = (&sampler{}).read(); err != nil {
		return err
	}
	if err := read(&r.from, &r.ioFrom, &r.etcdMFrom, &r.etcdFrom); err != nil {
		return err
	}
	logf("measuring for %s", o.duration)
	if err := sleep(ctx, o.duration); err != nil {
		return err
	}
	if err := read(&r.to, &r.ioTo, &r.etcdMTo, &r.etcdTo); err != nil {
		return err
	}
	if r.report.to, err = (&sampler{}).read(); err != nil {
		return err
	}
	r.window = r.report.to.At.Sub(r.report.from.At)
	err = r.closeWindow(pools)
	r.genCPU = cpuSeconds(genFrom, processCPU(genPIDs), r.hz)
	return err
}

// checkConsistency reads a sample of nodes spread over the fleet through
// every member: each should say the same, and online.
func (r *clusterReport) checkConsistency(ctx context.Context, keys []nodeKey) {
	k, n := min(r.o.consistencySample, len(keys)), len(r.cl.apis)
	if k == 0 {
		return
	}
	answers := make([][]string, k)
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for j := range k {
		answers[j] = make([]string, n)
		id := keys[j*len(keys)/k].NodeID
		for m, c := range r.cl.apis {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				st, err := c.nodeStatus(ctx, id)
				if err != nil {
					st = "error"
				}
				answers[j][m] = st
			})
		}
	}
	wg.Wait()
	c := consistency{nodes: k, answers: k * n}
	for j, a := range answers {
		for _, st := range a {
			switch st {
			case "online":
				c.online++
			case "error":
				c.errors++
			}
		}
		if slices.IndexFunc(a, func(s string) bool { return s != a[0] }) < 0 && a[0] != "error" {
			c.agree++
		} else if len(c.diffs) < 3 {
			c.diffs = append(c.diffs, keys[j*len(keys)/k].NodeID+": "+strings.Join(a, "/"))
		}
	}
	r.consist = c
}

// failover stops a sample of the chosen member's agents for good, SIGKILLs
// the member, and polls until every other agent is connected to another
// member and every surviving member counts exactly the running agents
// online.
func (r *clusterReport) failover(ctx context.Context, o *options, pools []pool, keys []nodeKey) error {
	n, kill := len(r.pids), o.killMember
	f := &failover{killed: kill, pid: r.pids[kill], allReconnected: -1, statsExact: -1, statsStable: -1,
		fleetOnline: -1, minOnline: math.MaxInt, lostOffline: newHistogram(), movedSeen: newHistogram()}
	r.fail = f
	for i := range n {
		if i != kill {
			f.survivors = append(f.survivors, i)
		}
	}
	st, err := statusAll(pools, time.Time{}, n)
	if err != nil {
		return err
	}
	f.agentsOnKilled = st.PerMember[kill]

	// The lost sample: agents of the member that stop heartbeating now and
	// never reconnect, as if their machines went down with it.
	var home []int
	for i, k := range keys {
		if k.Home == kill {
			home = append(home, i)
		}
	}
	byPool := make([]map[string]string, len(pools))
	for i := range byPool {
		byPool[i] = map[string]string{}
	}
	lostIdx := map[int]bool{}
	for j := range min(o.killLost, len(home)) {
		i := home[j*len(home)/o.killLost]
		lostIdx[i] = true
		byPool[poolOf(i, len(keys), len(pools))][keys[i].NodeID] = stopSilent
	}
	var moving []string
	for _, i := range home {
		if !lostIdx[i] {
			moving = append(moving, keys[i].NodeID)
		}
	}
	var moved []string
	for j := range min(movedSample, len(moving)) {
		moved = append(moved, moving[j*len(moving)/min(movedSample, len(moving))])
	}
	f.moved = len(moved)
	var mu sync.Mutex
	if err := eachPoolIndexed(pools, func(i int, p pool) error {
		res, err := p.stop(byPool[i])
		mu.Lock()
		for _, s := range res {
			f.lost = append(f.lost, s.NodeID)
		}
		mu.Unlock()
		return err
	}); err != nil {
		return err
	}
	f.expected = st.Up - len(f.lost)

	readSurvivors := func() []sample {
		out := make([]sample, n)
		for _, i := range f.survivors {
			out[i], _ = (&sampler{pid: r.pids[i]}).read()
		}
		return out
	}
	f.cpuFrom, f.etcdFrom = readSurvivors(), r.cl.etcdMetrics(ctx)
	logf("SIGKILL member %d (pid %d, %d agents, %d of them stopped with it)", kill, f.pid, f.agentsOnKilled, len(f.lost))
	victim := r.cl.members[kill]
	r.cl.killed = kill
	killedAt := time.Now()
	f.killedAt = killedAt
	if err := victim.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill member %d: %w", kill, err)
	}
	<-victim.exited
	giveUp := killedAt.Add(o.failoverTimeout)

	// Each lost node through each survivor, until it shows offline.
	lostCtx, stopLost := context.WithDeadline(ctx, giveUp)
	defer stopLost()
	var lostWG sync.WaitGroup
	var lostMu sync.Mutex
	for _, id := range f.lost {
		for _, m := range f.survivors {
			c := r.cl.apis[m]
			lostWG.Go(func() {
				for lostCtx.Err() == nil {
					if st, err := c.nodeStatus(lostCtx, id); err == nil && st == "offline" {
						lostMu.Lock()
						f.lostOffline.record(time.Since(killedAt))
						lostMu.Unlock()
						return
					}
					_ = sleep(lostCtx, 50*time.Millisecond)
				}
				lostMu.Lock()
				f.lostMissed++
				lostMu.Unlock()
			})
		}
	}
	// A sample of the moving nodes through each survivor, until it shows
	// them online on their new connection.
	for _, id := range moved {
		for _, m := range f.survivors {
			c := r.cl.apis[m]
			lostWG.Go(func() {
				for lostCtx.Err() == nil {
					st, since, err := c.nodeConnection(lostCtx, id)
					if err == nil && st != "offline" && since.After(killedAt) {
						lostMu.Lock()
						f.movedSeen.record(time.Since(killedAt))
						lostMu.Unlock()
						return
					}
					_ = sleep(lostCtx, 50*time.Millisecond)
				}
				lostMu.Lock()
				f.movedMissed++
				lostMu.Unlock()
			})
		}
	}
	lostDone := make(chan struct{})
	go func() { lostWG.Wait(); close(lostDone) }()

	counts := make([]int, n)
	errs := make([]error, n)
	lastBad := time.Duration(0)
	wasExact := false
	for {
		st, err := statusAll(pools, killedAt, n)
		if err != nil {
			return err
		}
		var wg sync.WaitGroup
		for _, m := range f.survivors {
			wg.Go(func() { counts[m], errs[m] = r.cl.apis[m].onlineNodes(ctx) })
		}
		wg.Wait()
		now := time.Since(killedAt)
		reconnected := st.Down == 0 && st.PerMember[kill] == 0
		exact := true
		for _, m := range f.survivors {
			if errs[m] != nil {
				exact = false
				continue
			}
			f.minOnline, f.maxOnline = min(f.minOnline, counts[m]), max(f.maxOnline, counts[m])
			if counts[m] != f.expected {
				exact = false
			}
		}
		if reconnected && f.allReconnected < 0 {
			f.allReconnected = now
		}
		if exact && f.statsExact < 0 {
			f.statsExact = now
		}
		if exact && !wasExact {
			f.statsStable = now
		}
		wasExact = exact
		switch {
		case reconnected && exact && f.fleetOnline < 0:
			f.fleetOnline = now
			f.cpuTo, f.etcdTo, f.costWindow = readSurvivors(), r.cl.etcdMetrics(ctx), time.Since(killedAt)
			logf("fleet online again %s after the kill", now.Round(time.Millisecond))
		case f.fleetOnline >= 0 && !(reconnected && exact):
			f.relapses++
		}
		if !(reconnected && exact) {
			lastBad = now
		}
		f.reconnected, f.perMemberAfter = st.Reconnected, st.PerMember
		f.reconnectAfter = st.ReconnectAfter.histogram()
		f.polled = now
		lostFinished := false
		select {
		case <-lostDone:
			lostFinished = true
		default:
		}
		// Done once the fleet has stayed online for 3 s and every lost node
		// was seen offline (or given up on).
		if f.fleetOnline >= 0 && now-lastBad >= 3*time.Second && lostFinished {
			break
		}
		if time.Now().After(giveUp) {
			f.timedOut = true
			break
		}
		if err := sleep(ctx, failoverPoll); err != nil {
			return err
		}
	}
	if f.cpuTo == nil { // never online: the cost up to the end of polling
		f.cpuTo, f.etcdTo, f.costWindow = readSurvivors(), r.cl.etcdMetrics(ctx), time.Since(killedAt)
	}
	stopLost()
	<-lostDone
	return nil
}

// print writes the report as a two-column table, the single mode's rows
// first (cluster-wide), then per member, then the failover.
func (r *clusterReport) print(w io.Writer) {
	o := r.o
	row := func(name, format string, args ...any) {
		fmt.Fprintf(w, "%-44s %s\n", name, fmt.Sprintf(format, args...))
	}
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)) }
	sec := func(d time.Duration) string {
		if d < 0 {
			return "never"
		}
		return fmt.Sprintf("%.2f s", d.Seconds())
	}
	n := len(r.pids)
	secs := r.window.Seconds()

	fmt.Fprintf(w, "fleetload: %d agents on a cluster of %d coordinators, heartbeat every %s, %s window\n", o.agents, n, o.interval, o.duration)
	row("machine", "%s", r.machine)
	row("command", "%s", r.command)
	row("load generator", "%d process(es), on the same machine as the cluster", r.workers)
	row("cluster", "%d coordinators and one etcd %s (one member, data on local disk), all on this machine; started in %s",
		n, r.cl.etcdVersion, r.startTime.Round(100*time.Millisecond))
	fmt.Fprintln(w, strings.Repeat("-", 90))
	row("nodes registered", "%d in %s (%.0f/s), through the members in turn", r.registered, r.registerTime.Round(time.Millisecond),
		float64(r.registered)/r.registerTime.Seconds())
	row("agents connected", "%d of %d (%d failed, %d retried handshakes), agent i to member i mod %d", r.conn.Connected, o.agents,
		r.conn.Failed, r.conn.Retries, n)
	row("connect rate", "%.0f agents/s (%s for all, %d handshakes in flight)", float64(r.conn.Connected)/r.connectTime.Seconds(),
		r.connectTime.Round(time.Millisecond), o.connectInFlight)
	row("  dial to welcome p50 / p99", "%s / %s ms", ms(r.connLatency.percentile(0.5)), ms(r.connLatency.percentile(0.99)))
	if r.etcdConnFrom != nil && r.etcdConnTo != nil {
		p := r.etcdConnFrom.delta(r.etcdConnTo, "etcd_server_proposals_committed_total")
		row("  etcd writes while connecting", "%.0f raft proposals (%.2f per agent), %.0f txns, %.0f fsyncs",
			p, p/float64(max(r.conn.Connected, 1)), r.etcdConnFrom.delta(r.etcdConnTo, "etcd_mvcc_txn_total"),
			r.etcdConnFrom.delta(r.etcdConnTo, "etcd_disk_wal_fsync_duration_seconds_count"))
	}

	// Per member.
	var totalCPU, totalRSS float64
	for i := range n {
		agents := r.agentsAt[i]
		var mw memberWindow
		if i < len(r.perMember.Members) {
			mw = r.perMember.Members[i]
		}
		cpu := cpuSeconds(r.from[i].CPU, r.to[i].CPU, r.hz)
		totalCPU += cpu
		d := float64(r.to[i].Mem.RSS) - float64(r.base[i].Mem.RSS)
		totalRSS += d
		row(fmt.Sprintf("member %d (pid %d)", i, r.pids[i]), "%d agents, %d heartbeats acked (%.0f/s)", agents, mw.Acked, float64(mw.Acked)/secs)
		row("  RSS per agent", "%.1f KiB (baseline %.1f MiB, steady %.1f MiB)", d/float64(max(agents, 1))/1024,
			mib(r.base[i].Mem.RSS), mib(r.to[i].Mem.RSS))
		row("  CPU per heartbeat", "%.1f µs (%.2f CPU-s in %.1f s = %.0f%% of one core)", cpu/float64(max(mw.Acked, 1))*1e6, cpu, secs, cpu/secs*100)
		h := mw.Hist.histogram()
		row("  ack latency p50 / p99 / max", "%s / %s / %s ms", ms(h.percentile(0.5)), ms(h.percentile(0.99)), ms(h.max))
		if r.ioOK {
			out := float64(r.ioTo[i].WChar-r.ioFrom[i].WChar) - float64(mw.BytesIn)
			in := float64(r.ioTo[i].RChar-r.ioFrom[i].RChar) - float64(mw.BytesOut)
			row("  I/O beyond its agents, out / in", "%.1f / %.1f KiB/s (/proc/PID/io less the agents' WebSocket payload)", out/secs/1024, in/secs/1024)
		}
	}
	row("all members", "%d agents; RSS %.1f KiB per agent; CPU %.1f µs per heartbeat (%.2f CPU-s = %.2f cores)",
		r.conn.Connected, totalRSS/float64(max(r.conn.Connected, 1))/1024, totalCPU/float64(max(r.acked, 1))*1e6, totalCPU, totalCPU/secs)
	etcdCPU := cpuSeconds(r.etcdFrom.CPU, r.etcdTo.CPU, r.hz)
	if r.etcdMFrom != nil && r.etcdMTo != nil {
		row("etcd in window", "CPU %.2f cores, RSS %.1f MiB; %.1f proposals/s, %.1f txns/s, %.1f ranges/s, %.1f fsyncs/s",
			etcdCPU/secs, mib(r.etcdTo.Mem.RSS), r.etcdMFrom.delta(r.etcdMTo, "etcd_server_proposals_committed_total")/secs,
			r.etcdMFrom.delta(r.etcdMTo, "etcd_mvcc_txn_total")/secs, r.etcdMFrom.delta(r.etcdMTo, "etcd_mvcc_range_total")/secs,
			r.etcdMFrom.delta(r.etcdMTo, "etcd_disk_wal_fsync_duration_seconds_count")/secs)
		row("  etcd gRPC in / out, keys, db size", "%.1f / %.1f KiB/s, %.0f keys, %.1f MiB",
			r.etcdMFrom.delta(r.etcdMTo, "etcd_network_client_grpc_received_bytes_total")/secs/1024,
			r.etcdMFrom.delta(r.etcdMTo, "etcd_network_client_grpc_sent_bytes_total")/secs/1024,
			r.etcdMTo["etcd_debugging_mvcc_keys_total"], r.etcdMTo["etcd_mvcc_db_total_size_in_bytes"]/(1<<20))
	}

	// Cluster-wide, as the single mode.
	row("heartbeats acked in window", "%d (%.0f/s; %d not accepted)", r.acked, float64(r.acked)/secs, r.rejected)
	m := machineBetween(r.report.from.Machine, r.report.to.Machine, runtime.NumCPU())
	coord, etcd, gen := totalCPU/secs, etcdCPU/secs, r.genCPU/secs
	row("machine CPU in window, in CPUs", "%.2f of %d busy: coordinators %.2f, etcd %.2f, load generator %.2f, other processes %.2f; irq+softirq %.2f, steal %.2f",
		m.Busy+m.IRQ, runtime.NumCPU(), coord, etcd, gen, max(m.Busy-coord-etcd-gen, 0), m.IRQ, m.Steal)
	row("ack latency p50 / p99 / max", "%s / %s / %s ms (%d samples)",
		ms(r.hist.percentile(0.50)), ms(r.hist.percentile(0.99)), ms(r.hist.max), r.hist.n)
	row("  send -> coordinator's received_at", "%s / %s / %s ms (the rest is the way back; one clock only on one host)",
		ms(r.inbound.percentile(0.50)), ms(r.inbound.percentile(0.99)), ms(r.inbound.max))
	row("false offline detections", "%d (running agents closed with 4008 before the kill)", r.final.Unexpected[fleet.CloseHeartbeatTimeout])
	if other := codes(r.final.Unexpected, fleet.CloseHeartbeatTimeout); other != "" {
		row("  other unexpected disconnects", "%s (1006, -1: no close frame)", other)
	}
	row("heartbeats unacked after 1 s", "%d of %d sent", r.final.UnackedOld, r.final.Sent)
	var via []string
	ok := true
	for i, c := range r.onlineVia {
		if r.onlineErr[i] != nil {
			via = append(via, "error")
			ok = false
			continue
		}
		via = append(via, strconv.Itoa(c))
		ok = ok && c == r.conn.Connected
	}
	row("stats online_nodes through each member", "%s, expected %d: %s", strings.Join(via, " / "), r.conn.Connected, okMark(ok))
	if i := slices.IndexFunc(r.onlineErr, func(err error) bool { return err != nil }); i >= 0 {
		row("  first error", "member %d: %v", i, r.onlineErr[i])
	}
	if c := r.consist; c.nodes > 0 {
		row(fmt.Sprintf("consistency, %d nodes x %d members", c.nodes, n), "%d of %d answers online (%d errors); members agree on %d of %d nodes",
			c.online, c.answers, c.errors, c.agree, c.nodes)
		for _, d := range c.diffs {
			row("  disagreement", "%s", d)
		}
	}
	if f := r.fail; f != nil {
		r.printFailover(row, ms, sec)
	}
	if len(r.logs) == 0 {
		row("members' log (warn and above)", "empty")
	}
	for i, c := range r.logs {
		if i == 8 {
			row("", "... %d more messages", len(r.logs)-i)
			break
		}
		name := ""
		if i == 0 {
			name = "members' log (warn and above)"
		}
		row(name, "%d× %q (members %v)", c.N, c.Msg, c.Members)
	}
}

func (r *clusterReport) printFailover(row func(string, string, ...any), ms func(time.Duration) string, sec func(time.Duration) string) {
	f := r.fail
	row("member loss", "SIGKILL member %d (pid %d), which held %d agents; %d of them stopped with it for good",
		f.killed, f.pid, f.agentsOnKilled, len(f.lost))
	ra := f.reconnectAfter
	row("  every agent reconnected elsewhere", "%s after the kill (%d agents reconnected; each p50 %s / p99 %s / max %s ms)",
		sec(f.allReconnected), f.reconnected, ms(ra.percentile(0.5)), ms(ra.percentile(0.99)), ms(ra.max))
	minOnline := f.minOnline
	if minOnline == math.MaxInt {
		minOnline = 0
	}
	row(fmt.Sprintf("  online_nodes == %d via every survivor", f.expected), "first %s, and from %s on (lowest seen %d, highest %d)",
		sec(f.statsExact), sec(f.statsStable), minOnline, f.maxOnline)
	line := sec(f.fleetOnline) + " after the kill"
	if f.fleetOnline >= 0 {
		line += fmt.Sprintf(" (polls %s apart: an upper bound)", failoverPoll)
	}
	if f.relapses > 0 {
		line += fmt.Sprintf("; not so again in %d later polls", f.relapses)
	}
	if f.timedOut {
		line += fmt.Sprintf("; gave up after %s", f.polled.Round(100*time.Millisecond))
	}
	row("  whole fleet online again", "%s", line)
	if f.moved > 0 {
		mv := f.movedSeen
		row(fmt.Sprintf("  moved nodes seen anew, %d x %d survivors", f.moved, len(f.survivors)), "p50 %s / max %s after the kill (online, connected_since after it; %d never)",
			sec(mv.percentile(0.5)), sec(mv.max), f.movedMissed)
	}
	if len(f.lost) > 0 {
		l := f.lostOffline
		row(fmt.Sprintf("  lost nodes offline, %d x %d survivors", len(f.lost), len(f.survivors)), "p50 %s / max %s after the kill (%d never seen offline; REST poll every 50ms)",
			sec(l.percentile(0.5)), sec(l.max), f.lostMissed)
	}
	var after []string
	for i, c := range f.perMemberAfter {
		if i == f.killed {
			after = append(after, "-")
		} else {
			after = append(after, strconv.Itoa(c))
		}
	}
	row("  agents per member after", "%s", strings.Join(after, " / "))
	killed := codes(r.final.KilledEnds, 0)
	if killed == "" {
		killed = "none"
	}
	other := codes(r.final.OtherEnds, 0)
	if other == "" {
		other = "none"
	}
	row("  disconnects after the kill", "from the killed member: %s; from the others: %s (1006, -1: no close frame)", killed, other)
	if len(f.cpuTo) > 0 && f.costWindow > 0 {
		var cpu float64
		for _, i := range f.survivors {
			cpu += cpuSeconds(f.cpuFrom[i].CPU, f.cpuTo[i].CPU, r.hz)
		}
		p := f.etcdFrom.delta(f.etcdTo, "etcd_server_proposals_committed_total")
		row("  survivors and etcd until then", "survivors %.2f CPU-s in %.1f s; etcd %.0f proposals, %.0f txns",
			cpu, f.costWindow.Seconds(), p, f.etcdFrom.delta(f.etcdTo, "etcd_mvcc_txn_total"))
	}
}

// codes formats counts by close code, leaving one code out (0: none).
func codes(m map[int]int, except int) string {
	var out []string
	for code, n := range m {
		if code != except && n > 0 {
			out = append(out, fmt.Sprintf("%d×code %d", n, code))
		}
	}
	slices.Sort(out)
	return strings.Join(out, ", ")
}

func okMark(ok bool) string {
	if ok {
		return "ok"
	}
	return "MISMATCH"
}
