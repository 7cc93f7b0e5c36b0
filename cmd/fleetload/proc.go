package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// procStat is what fleetload reads of a process from /proc/PID/stat: the CPU
// time it has used, in clock ticks.
type procStat struct {
	UTime, STime uint64 // user and system time, in clock ticks
}

// parseProcStat parses the contents of /proc/PID/stat. The command name (the
// second field) is in parentheses and may itself hold spaces and
// parentheses, so the fields are counted from the last ')'.
func parseProcStat(data string) (procStat, error) {
	end := strings.LastIndexByte(data, ')')
	if end < 0 {
		return procStat{}, errors.New("/proc stat: no command name")
	}
	// After the name: state (field 3), ppid, ..., utime (14), stime (15).
	f := strings.Fields(data[end+1:])
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("/proc stat: %d fields after the name, want at least 13", len(f))
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return procStat{}, fmt.Errorf("/proc stat: utime/stime: %w", err)
	}
	return procStat{UTime: u, STime: s}, nil
}

func readProcStat(pid int) (procStat, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	return parseProcStat(string(data))
}

// memStatus is a process's resident memory from /proc/PID/status, in bytes.
type memStatus struct {
	RSS, RSSAnon, RSSFile uint64
}

// parseProcStatus reads VmRSS, RssAnon and RssFile (reported in kB) out of
// the contents of /proc/PID/status.
func parseProcStatus(data string) (memStatus, error) {
	var m memStatus
	found := false
	sc := bufio.NewScanner(strings.NewReader(data))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *uint64
		switch name {
		case "VmRSS":
			dst, found = &m.RSS, true
		case "RssAnon":
			dst = &m.RSSAnon
		case "RssFile":
			dst = &m.RSSFile
		default:
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return memStatus{}, fmt.Errorf("/proc status: %s: unexpected %q", name, rest)
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return memStatus{}, fmt.Errorf("/proc status: %s: %w", name, err)
		}
		*dst = kb << 10
	}
	if !found {
		return memStatus{}, errors.New("/proc status: no VmRSS")
	}
	return m, nil
}

func readProcStatus(pid int) (memStatus, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memStatus{}, err
	}
	return parseProcStatus(string(data))
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/PID/stat times:
// getconf's answer, or 100, which it is on every common Linux.
func clockTicks() float64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil && n > 0 {
			return float64(n)
		}
	}
	return 100
}

// cpuSeconds converts the CPU time between two readings to seconds.
func cpuSeconds(from, to procStat, hz float64) float64 {
	return float64((to.UTime+to.STime)-(from.UTime+from.STime)) / hz
}

// machineCPU is the first line of /proc/stat: clock ticks of all CPUs
// together. Busy is user, nice and system time; IRQ is hard and soft
// interrupts (where the kernel does much of loopback TCP); Steal is time the
// hypervisor gave to others; Idle includes iowait.
type machineCPU struct{ Busy, IRQ, Steal, Idle uint64 }

func readMachineCPU() (machineCPU, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return machineCPU{}, err
	}
	line, _, _ := bytes.Cut(data, []byte("\n"))
	return parseMachineCPU(string(line))
}

func parseMachineCPU(line string) (machineCPU, error) {
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return machineCPU{}, errors.New("/proc/stat: no cpu line with 8 times")
	}
	var t [8]uint64 // user nice system idle iowait irq softirq steal; guest time is in user
	for i := range t {
		n, err := strconv.ParseUint(f[i+1], 10, 64)
		if err != nil {
			return machineCPU{}, fmt.Errorf("/proc/stat: %w", err)
		}
		t[i] = n
	}
	return machineCPU{Busy: t[0] + t[1] + t[2], Idle: t[3] + t[4], IRQ: t[5] + t[6], Steal: t[7]}, nil
}

// machineShare is how the machine's CPUs were spent between two readings,
// in CPUs (of runtime.NumCPU): busy in processes, in interrupts, stolen.
type machineShare struct{ Busy, IRQ, Steal float64 }

func machineBetween(from, to machineCPU, cpus int) machineShare {
	busy, irq := float64(to.Busy-from.Busy), float64(to.IRQ-from.IRQ)
	steal, idle := float64(to.Steal-from.Steal), float64(to.Idle-from.Idle)
	total := busy + irq + steal + idle
	if total == 0 {
		return machineShare{}
	}
	n := float64(cpus)
	return machineShare{Busy: busy / total * n, IRQ: irq / total * n, Steal: steal / total * n}
}

// machine describes the host for the report: CPUs, model and memory.
func machine() string {
	model := "unknown CPU"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(data)) {
			if name, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := "unknown memory"
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.Lines(string(data)) {
			if name, v, ok := strings.Cut(line, ":"); ok && name == "MemTotal" {
				if f := strings.Fields(v); len(f) == 2 {
					if kb, err := strconv.ParseUint(f[0], 10, 64); err == nil {
						mem = fmt.Sprintf("%.1f GiB RAM", float64(kb)/(1<<20))
					}
				}
				break
			}
		}
	}
	kernel := ""
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = ", Linux " + strings.TrimSpace(string(data))
	}
	return fmt.Sprintf("%d CPUs (nproc), %s, %s%s, %s", runtime.NumCPU(), model, mem, kernel, runtime.Version())
}

// raiseFileLimit lifts this process's open-file soft limit to the hard
// limit, since every simulated agent holds a socket, and returns the limit.
func raiseFileLimit() (uint64, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, err
	}
	if l.Cur < l.Max {
		l.Cur = l.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
			return 0, err
		}
	}
	return l.Cur, nil
}

// sampler reads a process's CPU time and memory, when a PID is known.
type sampler struct {
	pid int
}

// sample is one reading of the coordinator (and of the machine).
type sample struct {
	At      time.Time
	CPU     procStat
	Mem     memStatus
	Machine machineCPU
}

func (s *sampler) read() (sample, error) {
	r := sample{At: time.Now()}
	var err error
	if r.Machine, err = readMachineCPU(); err != nil {
		return r, err
	}
	if s.pid == 0 {
		return r, nil
	}
	if r.CPU, err = readProcStat(s.pid); err != nil {
		return r, err
	}
	if r.Mem, err = readProcStatus(s.pid); err != nil {
		return r, err
	}
	return r, nil
}
