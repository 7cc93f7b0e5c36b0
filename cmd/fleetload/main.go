// Command fleetload load-tests a running coordinator with simulated host
// agents on the native /fleet WebSocket, and prints a table of what one
// coordinator costs per agent.
//
//	fleetload -spawn -coordinator-bin bin/coordinator -agents 2000 -duration 20s
//	fleetload -url http://127.0.0.1:3000 -coordinator-pid 1234 -agents 10000
//	fleetload -spawn-cluster 3 -coordinator-bin bin/coordinator -agents 3000 -duration 20s
//
// It registers the nodes over REST, connects every agent, lets each
// heartbeat at the agent's default interval (with a random initial phase)
// for the measurement window, then stops a sample of agents on purpose to
// time offline detection. Agents beyond -per-process are held by worker
// processes (this binary re-executed), because every process has its own
// open-file cap.
//
// With -spawn-cluster N it starts etcd and N coordinators as one cluster,
// spreads the agents over them, measures every member, and kills one at the
// end to time the fleet's failover (cluster.go).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/distributedcompute/fleet"
)

type options struct {
	url              string
	agents           int
	perProcess       int
	interval         time.Duration
	duration         time.Duration
	stopSample       int
	stopMode         string
	token            string
	devTokenCmd      string
	user             string
	coordinatorBin   string
	coordinatorPID   int
	spawn            bool
	registerInFlight int
	connectInFlight  int
	poll             time.Duration
	worker           bool

	// A cluster fleetload starts itself.
	spawnCluster      int
	etcdBin           string
	killMember        int
	killLost          int
	consistencySample int
	failoverTimeout   time.Duration
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("fleetload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.url, "url", "http://127.0.0.1:3000", "coordinator base URL (ignored with -spawn)")
	fs.IntVar(&o.agents, "agents", 1000, "simulated agents")
	fs.IntVar(&o.perProcess, "per-process", 9000, "most agents one process holds; more start worker processes (each process has its own open-file cap)")
	fs.DurationVar(&o.interval, "interval", 2*time.Second, "heartbeat interval of each agent (the agent's default)")
	fs.DurationVar(&o.duration, "duration", 30*time.Second, "measurement window, after every agent has connected")
	fs.IntVar(&o.stopSample, "stop-sample", 20, "agents stopped on purpose at the end to time offline detection")
	fs.StringVar(&o.stopMode, "stop-mode", "both", "how sample agents stop: close (drop TCP, no close frame), silent (stop heartbeating, keep the socket), or both (half each)")
	fs.StringVar(&o.token, "token", "", "session token for registering nodes (default: mint one with the coordinator's dev-token)")
	fs.StringVar(&o.devTokenCmd, "dev-token-cmd", "", "shell command that prints a session token (default: <coordinator-bin> dev-token --user <user>)")
	fs.StringVar(&o.user, "user", "load_user", "user ID of the dev token, who owns the registered nodes")
	fs.StringVar(&o.coordinatorBin, "coordinator-bin", "bin/coordinator", "coordinator binary, for -spawn and for minting a dev token (same DATA_DIR as the coordinator)")
	fs.IntVar(&o.coordinatorPID, "coordinator-pid", 0, "PID of the coordinator, to read its memory and CPU from /proc")
	fs.BoolVar(&o.spawn, "spawn", false, "start the coordinator itself: dev auth, a fresh DATA_DIR, a free port, no rate limit in the way")
	fs.IntVar(&o.registerInFlight, "register-concurrency", 32, "registrations in flight")
	fs.IntVar(&o.connectInFlight, "connect-concurrency", 64, "agent handshakes in flight, over all processes")
	fs.DurationVar(&o.poll, "poll", 10*time.Millisecond, "how often a stopped agent's status is polled")
	fs.IntVar(&o.spawnCluster, "spawn-cluster", 0, "start a cluster of this many coordinators on a real etcd (started too) and spread the agents over them; see BENCHMARKS.md")
	fs.StringVar(&o.etcdBin, "etcd-bin", "etcd", "etcd binary, for -spawn-cluster")
	fs.IntVar(&o.killMember, "kill-member", 0, "with -spawn-cluster: the member SIGKILLed at the end to time the fleet's failover; -1 for none")
	fs.IntVar(&o.killLost, "kill-lost", 10, "with -spawn-cluster: agents of the killed member stopped with it, never to return, to time how soon its nodes stop showing online")
	fs.IntVar(&o.consistencySample, "consistency-sample", 60, "with -spawn-cluster: nodes whose status is read through every member")
	fs.DurationVar(&o.failoverTimeout, "failover-timeout", 90*time.Second, "with -spawn-cluster: longest wait for the fleet to be online again after the kill")
	fs.BoolVar(&o.worker, "worker", false, "") // internal: hold agents for a parent fleetload
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: fleetload [flags]")
		fs.VisitAll(func(f *flag.Flag) {
			if f.Name == "worker" {
				return
			}
			fmt.Fprintf(stderr, "  -%s (default %q)\n    \t%s\n", f.Name, f.DefValue, f.Usage)
		})
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	switch {
	case fs.NArg() > 0:
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	case o.worker:
		return o, nil
	case o.agents < 1:
		return nil, errors.New("-agents must be at least 1")
	case o.perProcess < 1:
		return nil, errors.New("-per-process must be at least 1")
	case o.interval <= 0 || o.duration <= 0 || o.poll <= 0:
		return nil, errors.New("-interval, -duration and -poll must be positive")
	case o.stopSample < 0 || o.stopSample > o.agents:
		return nil, errors.New("-stop-sample must be between 0 and -agents")
	case o.stopMode != stopClose && o.stopMode != stopSilent && o.stopMode != "both":
		return nil, errors.New("-stop-mode must be close, silent or both")
	case o.registerInFlight < 1 || o.connectInFlight < 1:
		return nil, errors.New("-register-concurrency and -connect-concurrency must be at least 1")
	case o.spawn && o.coordinatorPID != 0:
		return nil, errors.New("-spawn and -coordinator-pid exclude each other")
	case o.spawnCluster < 0:
		return nil, errors.New("-spawn-cluster must not be negative")
	case o.spawnCluster > 0 && (o.spawn || o.coordinatorPID != 0 || set["url"]):
		return nil, errors.New("-spawn-cluster excludes -spawn, -coordinator-pid and -url")
	case o.spawnCluster > 0 && set["stop-sample"]:
		return nil, errors.New("-stop-sample is for one coordinator; with -spawn-cluster the member kill times detection (-kill-lost)")
	case o.spawnCluster > 0 && (o.killMember < -1 || o.killMember >= o.spawnCluster):
		return nil, errors.New("-kill-member must be -1 or a member index below -spawn-cluster")
	case o.spawnCluster == 1 && set["kill-member"] && o.killMember >= 0:
		return nil, errors.New("-kill-member needs at least two members: the fleet fails over to the others")
	case o.spawnCluster > 0 && set["kill-lost"] && (o.killLost < 0 || o.killLost > o.agents/o.spawnCluster):
		return nil, errors.New("-kill-lost must be between 0 and the agents of one member")
	case o.consistencySample < 0 || o.failoverTimeout <= 0:
		return nil, errors.New("-consistency-sample must not be negative and -failover-timeout must be positive")
	}
	if o.spawnCluster > 0 && !set["kill-lost"] {
		o.killLost = min(o.killLost, o.agents/o.spawnCluster/2) // leave agents to move
	}
	if o.spawnCluster == 1 && !set["kill-member"] {
		o.killMember = -1 // nowhere to fail over to
	}
	if o.spawnCluster > 0 {
		o.stopSample = 0
	}
	return o, nil
}

func main() {
	limit, err := raiseFileLimit()
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleetload: raising the open-file limit:", err)
	}
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleetload:", err)
		os.Exit(2)
	}
	if o.worker {
		if err := runWorker(os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "fleetload worker:", err)
			os.Exit(1)
		}
		return
	}
	if need := uint64(min(o.agents, o.perProcess)) + 64; limit > 0 && limit < need {
		fmt.Fprintf(os.Stderr, "fleetload: open-file limit %d is below the %d one process needs; lower -per-process\n", limit, need)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if o.spawnCluster > 0 {
		cr, err := runCluster(ctx, o)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fleetload:", err)
			os.Exit(1)
		}
		cr.print(os.Stdout)
		return
	}
	r, err := run(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleetload:", err)
		os.Exit(1)
	}
	r.print(os.Stdout)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

// report is everything a run measured.
type report struct {
	o        *options
	command  string
	machine  string
	workers  int
	deadline time.Duration

	registered   int
	registerTime time.Duration
	conn         connectResult
	connectTime  time.Duration
	connLatency  *histogram

	window         time.Duration
	haveCoord      bool
	baseline       sample
	steady         sample
	goBase, goLive goStats
	from, to       sample  // coordinator and machine at the window's ends
	genCPU         float64 // load generator's CPU seconds in the window
	hz             float64
	hist, inbound  *histogram
	acked          uint64
	rejected       uint64
	perMember      windowResult // against a cluster: the window's figures by member

	stopped     []detection
	onlineAtEnd int
	onlineErr   error
	final       finalResult
}

// detection is how one agent stopped on purpose was seen offline.
type detection struct {
	stopResult
	offlineAt time.Time // first poll answer with status offline; zero if never
	closedAt  time.Time // when the server closed the socket (silent agents: 4008)
	closeCode int
}

func run(ctx context.Context, o *options) (*report, error) {
	r := &report{o: o, command: strings.Join(os.Args, " "), machine: machine(), hz: clockTicks()}
	base, pid, env := o.url, o.coordinatorPID, os.Environ()
	alive := func() error { return nil }
	if o.spawn {
		s, err := spawnCoordinator(ctx, o.coordinatorBin)
		if err != nil {
			return nil, err
		}
		defer s.stop()
		base, pid, env, alive = s.url, s.cmd.Process.Pid, s.env, s.alive
		logf("started coordinator pid %d at %s", pid, base)
	}
	r.haveCoord = pid != 0
	smp := &sampler{pid: pid}
	c := newAPI(base, max(o.registerInFlight, 32))
	c.token = o.token
	if c.token == "" {
		tok, err := devToken(ctx, o.coordinatorBin, o.devTokenCmd, o.user, env)
		if err != nil {
			return nil, fmt.Errorf("getting a token: %w", err)
		}
		c.token = tok
	}

	logf("registering %d nodes (%d in flight)", o.agents, o.registerInFlight)
	t0 := time.Now()
	keys, err := c.register(ctx, o.agents, o.registerInFlight)
	if err != nil {
		return nil, errors.Join(err, alive())
	}
	r.registered, r.registerTime = len(keys), time.Since(t0)
	// Idle keep-alive connections would hold file descriptors of the
	// coordinator's for the rest of the run.
	c.http.CloseIdleConnections()
	logf("registered %d nodes in %s", len(keys), r.registerTime.Round(time.Millisecond))

	time.Sleep(time.Second) // let the registration burst's garbage settle
	if r.baseline, err = smp.read(); err != nil {
		return nil, fmt.Errorf("reading the coordinator's baseline: %w", err)
	}
	r.goBase = c.goRuntime(ctx)

	pools, err := startPools(o, []string{wsURL(base)}, false, keys)
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

	if err := r.connect(o, pools); err != nil {
		return nil, errors.Join(err, alive())
	}
	// Every agent has heartbeated at least once before the window opens.
	if err := sleep(ctx, o.interval+500*time.Millisecond); err != nil {
		return nil, err
	}
	if err := r.measure(ctx, o, pools, smp); err != nil {
		return nil, errors.Join(err, alive())
	}
	r.goLive = c.goRuntime(ctx)

	if o.stopSample > 0 {
		logf("stopping %d agents on purpose (%s)", o.stopSample, o.stopMode)
		if r.stopped, err = stopSample(ctx, o, c, pools, keys, r.deadline); err != nil {
			return nil, err
		}
	}
	// The coordinator's own count: every agent still running is online.
	r.onlineAtEnd, r.onlineErr = c.onlineNodes(ctx)

	finished = true
	return r, r.finish(pools, time.Time{}, -1)
}

// connect connects every pool's agents at once and times it.
func (r *report) connect(o *options, pools []pool) error {
	logf("connecting %d agents in %d process(es), %d handshakes in flight", o.agents, len(pools), o.connectInFlight)
	perPool := (o.connectInFlight + len(pools) - 1) / len(pools)
	var mu sync.Mutex
	r.connLatency = newHistogram()
	t0 := time.Now()
	err := eachPool(pools, func(p pool) error {
		res, err := p.connect(perPool)
		mu.Lock()
		defer mu.Unlock()
		r.conn.Connected += res.Connected
		r.conn.Failed += res.Failed
		r.conn.Retries += res.Retries
		r.connLatency.merge(res.Latency.histogram())
		if r.conn.FirstError == "" {
			r.conn.FirstError = res.FirstError
		}
		if res.DeadlineMS > 0 {
			r.conn.DeadlineMS = res.DeadlineMS
		}
		return err
	})
	r.connectTime = time.Since(t0)
	if err != nil {
		return err
	}
	logf("connected %d agents in %s (%d failed, %d retries)", r.conn.Connected, r.connectTime.Round(time.Millisecond), r.conn.Failed, r.conn.Retries)
	if r.conn.Connected == 0 {
		return fmt.Errorf("no agent connected: %s", r.conn.FirstError)
	}
	r.deadline = time.Duration(r.conn.DeadlineMS) * time.Millisecond
	return nil
}

// measure runs the measurement window: the coordinator's CPU and memory
// at both ends, and the acks every pool saw in between.
func (r *report) measure(ctx context.Context, o *options, pools []pool, smp *sampler) error {
	genPIDs := generatorPIDs(pools)
	genFrom := processCPU(genPIDs)
	if err := eachPool(pools, func(p pool) error { return p.open() }); err != nil {
		return err
	}
	var err error
	if r.from, err = smp.read(); err != nil {
		return err
	}
	logf("measuring for %s", o.duration)
	if err := sleep(ctx, o.duration); err != nil {
		return err
	}
	if r.to, err = smp.read(); err != nil {
		return fmt.Errorf("reading the coordinator: %w", err)
	}
	r.steady, r.window = r.to, r.to.At.Sub(r.from.At)
	err = r.closeWindow(pools)
	r.genCPU = cpuSeconds(genFrom, processCPU(genPIDs), r.hz)
	return err
}

// closeWindow ends the measurement window of every pool and merges what
// they measured.
func (r *report) closeWindow(pools []pool) error {
	r.hist, r.inbound = newHistogram(), newHistogram()
	var mu sync.Mutex
	return eachPool(pools, func(p pool) error {
		w, err := p.close()
		mu.Lock()
		defer mu.Unlock()
		r.hist.merge(w.Hist.histogram())
		r.inbound.merge(w.Inbound.histogram())
		r.acked += w.Acked
		r.rejected += w.Rejected
		r.perMember.mergeMembers(w.Members)
		return err
	})
}

// generatorPIDs are the load generator's processes: this one and its
// workers.
func generatorPIDs(pools []pool) []int {
	pids := []int{os.Getpid()}
	for _, p := range pools {
		if !slices.Contains(pids, p.pid()) {
			pids = append(pids, p.pid())
		}
	}
	return pids
}

// finish collects how every agent fared and disconnects them. Against a
// cluster, since is when member killed was killed (zero and -1 if none
// was).
func (r *report) finish(pools []pool, since time.Time, killed int) error {
	r.final.Unexpected = map[int]int{}
	r.final.KilledEnds, r.final.OtherEnds = map[int]int{}, map[int]int{}
	var mu sync.Mutex
	return eachPool(pools, func(p pool) error {
		f, err := p.finish(since, killed)
		mu.Lock()
		defer mu.Unlock()
		r.final.Sent += f.Sent
		r.final.UnackedOld += f.UnackedOld
		r.final.Reconnects += f.Reconnects
		for code, n := range f.Unexpected {
			r.final.Unexpected[code] += n
		}
		for code, n := range f.KilledEnds {
			r.final.KilledEnds[code] += n
		}
		for code, n := range f.OtherEnds {
			r.final.OtherEnds[code] += n
		}
		for id, sc := range f.ServerClosed {
			for i := range r.stopped {
				if r.stopped[i].NodeID == id {
					r.stopped[i].closedAt, r.stopped[i].closeCode = sc.At, sc.Code
				}
			}
		}
		return err
	})
}

func wsURL(base string) string { return "ws" + strings.TrimPrefix(base, "http") + "/fleet" }

// startPools puts the agents in this process when they fit, else splits
// them evenly over worker processes. urls are the /fleet URLs of the
// members (one without a cluster); each key names its first; reconnect
// makes agents move on to the next member when a connection ends.
func startPools(o *options, urls []string, reconnect bool, keys []nodeKey) ([]pool, error) {
	n := (len(keys) + o.perProcess - 1) / o.perProcess
	if n == 1 {
		return []pool{newLocalPool(urls, reconnect, o.interval, keys)}, nil
	}
	var pools []pool
	for i := range n {
		part := keys[i*len(keys)/n : (i+1)*len(keys)/n]
		w, err := startWorker(workerSetup{WSURLs: urls, Reconnect: reconnect, Interval: o.interval, Keys: part})
		if err != nil {
			for _, p := range pools {
				p.(*remotePool).kill()
			}
			return nil, err
		}
		pools = append(pools, w)
	}
	return pools, nil
}

// eachPool runs f on every pool at once and returns their errors.
func eachPool(pools []pool, f func(pool) error) error {
	return eachPoolIndexed(pools, func(_ int, p pool) error { return f(p) })
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// processCPU sums the CPU time of processes, for the load generator's own
// share of the machine.
func processCPU(pids []int) procStat {
	var sum procStat
	for _, pid := range pids {
		if s, err := readProcStat(pid); err == nil {
			sum.UTime += s.UTime
			sum.STime += s.STime
		}
	}
	return sum
}

// stopSample stops agents spread evenly over the fleet, then polls each
// one's public status until it shows offline.
func stopSample(ctx context.Context, o *options, c *api, pools []pool, keys []nodeKey, deadline time.Duration) ([]detection, error) {
	n, k := len(keys), o.stopSample
	modes := make(map[string]string, k)
	for j := range k {
		mode := o.stopMode
		if mode == "both" {
			mode = stopSilent
			if j%2 == 1 {
				mode = stopClose
			}
		}
		modes[keys[j*n/k+n/(2*k)].NodeID] = mode
	}
	// Ask each pool to stop only its own agents: the pools split keys in
	// order, so a node's pool is known from its index.
	byPool := make([]map[string]string, len(pools))
	for i := range byPool {
		byPool[i] = map[string]string{}
	}
	for i, key := range keys {
		if m, ok := modes[key.NodeID]; ok {
			byPool[poolOf(i, n, len(pools))][key.NodeID] = m
		}
	}
	var mu sync.Mutex
	var stopped []stopResult
	err := eachPoolIndexed(pools, func(i int, p pool) error {
		res, err := p.stop(byPool[i])
		mu.Lock()
		stopped = append(stopped, res...)
		mu.Unlock()
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]detection, len(stopped))
	var wg sync.WaitGroup
	for i, s := range stopped {
		out[i].stopResult = s
		wg.Go(func() {
			start := s.StoppedAt
			if s.Mode == stopSilent {
				start = s.LastHeartbeat.Add(deadline - 300*time.Millisecond)
			}
			giveUp := s.LastHeartbeat.Add(deadline + 10*time.Second)
			if err := sleep(ctx, time.Until(start)); err != nil {
				return
			}
			for time.Now().Before(giveUp) && ctx.Err() == nil {
				st, err := c.nodeStatus(ctx, s.NodeID)
				if err == nil && st == "offline" {
					out[i].offlineAt = time.Now()
					return
				}
				_ = sleep(ctx, o.poll)
			}
		})
	}
	wg.Wait()
	return out, ctx.Err()
}

// poolOf is the pool that holds key i of n split over pools by startPools.
func poolOf(i, n, pools int) int {
	for p := range pools {
		if i < (p+1)*n/pools {
			return p
		}
	}
	return pools - 1
}

func eachPoolIndexed(pools []pool, f func(int, pool) error) error {
	errs := make([]error, len(pools))
	var wg sync.WaitGroup
	for i, p := range pools {
		wg.Go(func() { errs[i] = f(i, p) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// print writes the report as a two-column table.
func (r *report) print(w io.Writer) {
	o := r.o
	row := func(name, format string, args ...any) {
		fmt.Fprintf(w, "%-44s %s\n", name, fmt.Sprintf(format, args...))
	}
	na := "n/a (needs -spawn or -coordinator-pid)"
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)) }

	fmt.Fprintf(w, "fleetload: %d agents, heartbeat every %s, %s window\n", o.agents, o.interval, o.duration)
	row("machine", "%s", r.machine)
	row("command", "%s", r.command)
	row("load generator", "%d process(es), on the same machine as the coordinator", r.workers)
	fmt.Fprintln(w, strings.Repeat("-", 90))
	row("nodes registered", "%d in %s (%.0f/s)", r.registered, r.registerTime.Round(time.Millisecond), float64(r.registered)/r.registerTime.Seconds())
	row("agents connected", "%d of %d (%d failed, %d retried handshakes)", r.conn.Connected, o.agents, r.conn.Failed, r.conn.Retries)
	row("connect rate", "%.0f agents/s (%s for all, %d handshakes in flight)", float64(r.conn.Connected)/r.connectTime.Seconds(),
		r.connectTime.Round(time.Millisecond), o.connectInFlight)
	row("  dial to welcome p50 / p99", "%s / %s ms", ms(r.connLatency.percentile(0.5)), ms(r.connLatency.percentile(0.99)))
	if r.haveCoord {
		d := float64(r.steady.Mem.RSS) - float64(r.baseline.Mem.RSS)
		row("coordinator RSS per agent", "%.1f KiB (baseline %.1f MiB, steady %.1f MiB; anon %+.1f MiB, file %+.1f MiB)",
			d/float64(r.conn.Connected)/1024, mib(r.baseline.Mem.RSS), mib(r.steady.Mem.RSS),
			(float64(r.steady.Mem.RSSAnon)-float64(r.baseline.Mem.RSSAnon))/(1<<20),
			(float64(r.steady.Mem.RSSFile)-float64(r.baseline.Mem.RSSFile))/(1<<20))
	} else {
		row("coordinator RSS per agent", "%s", na)
	}
	if r.goBase.OK && r.goLive.OK {
		per := func(a, b float64) float64 { return (b - a) / float64(r.conn.Connected) }
		row("  Go runtime, per agent", "%.2f goroutines, %.1f KiB stacks, %.1f KiB heap in use, %.0f heap objects",
			per(r.goBase.Goroutines, r.goLive.Goroutines), per(r.goBase.StackInuse, r.goLive.StackInuse)/1024,
			per(r.goBase.HeapInuse, r.goLive.HeapInuse)/1024, per(r.goBase.HeapObjects, r.goLive.HeapObjects))
	}
	secs := r.window.Seconds()
	row("heartbeats acked in window", "%d (%.0f/s; %d not accepted)", r.acked, float64(r.acked)/secs, r.rejected)
	if r.haveCoord && r.acked > 0 {
		cpu := cpuSeconds(r.from.CPU, r.to.CPU, r.hz)
		row("coordinator CPU per heartbeat", "%.1f µs (%.2f CPU-s in %.1f s = %.0f%% of one core)",
			cpu/float64(r.acked)*1e6, cpu, secs, cpu/secs*100)
	} else {
		row("coordinator CPU per heartbeat", "%s", na)
	}
	m := machineBetween(r.from.Machine, r.to.Machine, runtime.NumCPU())
	coordCPU := 0.0
	if r.haveCoord {
		coordCPU = cpuSeconds(r.from.CPU, r.to.CPU, r.hz) / secs
	}
	row("machine CPU in window, in CPUs", "%.2f of %d busy: coordinator %.2f, load generator %.2f, other processes %.2f; irq+softirq %.2f, steal %.2f",
		m.Busy+m.IRQ, runtime.NumCPU(), coordCPU, r.genCPU/secs, max(m.Busy-coordCPU-r.genCPU/secs, 0), m.IRQ, m.Steal)
	row("ack latency p50 / p99 / max", "%s / %s / %s ms (%d samples)",
		ms(r.hist.percentile(0.50)), ms(r.hist.percentile(0.99)), ms(r.hist.max), r.hist.n)
	row("  send -> coordinator's received_at", "%s / %s / %s ms (the rest is the way back; one clock only on one host)",
		ms(r.inbound.percentile(0.50)), ms(r.inbound.percentile(0.99)), ms(r.inbound.max))
	falseOffline := r.final.Unexpected[fleet.CloseHeartbeatTimeout]
	var other []string
	for code, n := range r.final.Unexpected {
		if code != fleet.CloseHeartbeatTimeout {
			other = append(other, fmt.Sprintf("%d×code %d", n, code))
		}
	}
	slices.Sort(other)
	row("false offline detections", "%d (running agents closed with 4008)", falseOffline)
	if len(other) > 0 {
		row("  other unexpected disconnects", "%s (-1: no close frame)", strings.Join(other, ", "))
	}
	row("heartbeats unacked after 1 s", "%d of %d sent", r.final.UnackedOld, r.final.Sent)
	expected := r.conn.Connected - len(r.stopped)
	if r.onlineErr != nil {
		row("stats online_nodes at end", "error: %v", r.onlineErr)
	} else {
		mark := "ok"
		if r.onlineAtEnd != expected {
			mark = "MISMATCH"
		}
		row("stats online_nodes at end", "%d, expected %d: %s", r.onlineAtEnd, expected, mark)
	}
	if len(r.stopped) > 0 {
		r.printDetections(row, ms)
	}
}

func (r *report) printDetections(row func(string, string, ...any), ms func(time.Duration) string) {
	byMode := map[string][]detection{}
	for _, d := range r.stopped {
		byMode[d.Mode] = append(byMode[d.Mode], d)
	}
	within := r.deadline + 250*time.Millisecond
	for _, mode := range []string{stopSilent, stopClose} {
		ds := byMode[mode]
		if len(ds) == 0 {
			continue
		}
		beyond, after, closed := newHistogram(), newHistogram(), newHistogram()
		missed, late := 0, 0
		for _, d := range ds {
			if d.offlineAt.IsZero() {
				missed++
				continue
			}
			lag := d.offlineAt.Sub(d.LastHeartbeat.Add(r.deadline))
			beyond.record(max(lag, 0))
			after.record(d.offlineAt.Sub(d.StoppedAt))
			if d.offlineAt.Sub(d.LastHeartbeat) > within {
				late++
			}
			if mode == stopSilent && !d.closedAt.IsZero() && d.closeCode == fleet.CloseHeartbeatTimeout {
				closed.record(max(d.closedAt.Sub(d.LastHeartbeat.Add(r.deadline)), 0))
			}
		}
		switch mode {
		case stopSilent:
			row(fmt.Sprintf("offline lag beyond deadline, silent (%d)", len(ds)), "p50 %s / max %s ms (REST poll every %s)",
				ms(beyond.percentile(0.5)), ms(beyond.max), r.o.poll)
			if closed.n > 0 {
				row("  4008 close received, beyond deadline", "p50 %s / max %s ms (%d of %d)", ms(closed.percentile(0.5)), ms(closed.max), closed.n, len(ds))
			}
		case stopClose:
			row(fmt.Sprintf("offline after TCP drop, no close frame (%d)", len(ds)), "p50 %s / max %s ms after the drop",
				ms(after.percentile(0.5)), ms(after.max))
		}
		row(fmt.Sprintf("  within deadline (%s) + 250 ms", r.deadline), "%d of %d (%d never seen offline)", len(ds)-missed-late, len(ds), missed)
	}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }
