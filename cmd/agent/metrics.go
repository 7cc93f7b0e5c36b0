package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os/exec"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/distributedcompute/fleet"
	"github.com/shirou/gopsutil/v4/cpu"
	"github.com/shirou/gopsutil/v4/disk"
	"github.com/shirou/gopsutil/v4/load"
	"github.com/shirou/gopsutil/v4/mem"
)

// nvidiaSMITimeout bounds one nvidia-smi run; a hung driver must not stall
// sampling for long.
const nvidiaSMITimeout = 5 * time.Second

// nvidiaSMIArgs asks for one CSV line per GPU with the fields parseNvidiaSMI
// expects, in this order.
var nvidiaSMIArgs = []string{
	"--query-gpu=index,name,utilization.gpu,memory.used,memory.total,temperature.gpu",
	"--format=csv,noheader,nounits",
}

// diskPath is the filesystem whose usage is reported.
const diskPath = "/"

// collector samples the machine's metrics. It is used by one goroutine at a
// time.
type collector struct {
	log       *slog.Logger
	nvidiaSMI string // path, "" when there is none on PATH
	warned    map[string]bool
}

func newCollector(log *slog.Logger) *collector {
	c := &collector{log: log, warned: make(map[string]bool)}
	if p, err := exec.LookPath("nvidia-smi"); err == nil {
		c.nvidiaSMI = p
		log.Info("reporting GPUs with nvidia-smi", "path", p)
	}
	// cpu.Percent with a zero interval measures since the previous call;
	// this first call sets the baseline.
	_, _ = cpu.Percent(0, false)
	return c
}

// collect returns the current metrics, clamped so that they pass
// fleet.Metrics.Validate. A source that fails is reported as zero and
// warned about once.
func (c *collector) collect(ctx context.Context) fleet.Metrics {
	var m fleet.Metrics
	if p, err := cpu.PercentWithContext(ctx, 0, false); err != nil || len(p) == 0 {
		c.warn("cpu", err)
	} else {
		m.CPUPercent = clampPercent(p[0])
	}
	if v, err := mem.VirtualMemoryWithContext(ctx); err != nil {
		c.warn("memory", err)
	} else {
		m.MemoryTotalBytes, m.MemoryUsedBytes = v.Total, min(v.Used, v.Total)
	}
	if d, err := disk.UsageWithContext(ctx, diskPath); err != nil {
		c.warn("disk", err)
	} else {
		m.DiskTotalBytes, m.DiskUsedBytes = d.Total, min(d.Used, d.Total)
	}
	if l, err := load.AvgWithContext(ctx); err != nil {
		c.warn("load", err)
	} else {
		m.Load1, m.Load5, m.Load15 = clampLoad(l.Load1), clampLoad(l.Load5), clampLoad(l.Load15)
	}
	if c.nvidiaSMI != "" {
		gpus, err := c.gpus(ctx)
		if err != nil {
			c.warn("gpu", err)
		}
		m.GPUs = gpus
	}
	return m
}

func (c *collector) gpus(ctx context.Context) ([]fleet.GPU, error) {
	ctx, cancel := context.WithTimeout(ctx, nvidiaSMITimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.nvidiaSMI, nvidiaSMIArgs...)
	cmd.WaitDelay = time.Second
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("nvidia-smi: %w", err)
	}
	// Well-formed lines are reported even when others are not.
	return parseNvidiaSMI(string(out))
}

// warn logs a failing source once at warn level, then at debug level.
func (c *collector) warn(source string, err error) {
	if err == nil {
		err = errors.New("no value")
	}
	if c.warned[source] {
		c.log.Debug("metrics source failed", "source", source, "err", err)
		return
	}
	c.warned[source] = true
	c.log.Warn("metrics source failed; reporting zero", "source", source, "err", err)
}

// parseNvidiaSMI parses the CSV output of nvidia-smi run with nvidiaSMIArgs.
// Fields nvidia-smi cannot read ("[N/A]", "[Not Supported]") are reported as
// zero, or omitted for the temperature. Malformed lines are skipped and
// reported in the error; the GPUs of the other lines are returned with it.
func parseNvidiaSMI(out string) ([]fleet.GPU, error) {
	var gpus []fleet.GPU
	var errs []error
	for n, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if len(gpus) == fleet.MaxGPUsReported {
			errs = append(errs, fmt.Errorf("more than %d GPUs; the rest are not reported", fleet.MaxGPUsReported))
			break
		}
		g, err := parseNvidiaSMILine(line)
		if err != nil {
			errs = append(errs, fmt.Errorf("nvidia-smi line %d: %w", n+1, err))
			continue
		}
		gpus = append(gpus, g)
	}
	return gpus, errors.Join(errs...)
}

func parseNvidiaSMILine(line string) (fleet.GPU, error) {
	var g fleet.GPU
	f := strings.Split(line, ",")
	if len(f) < 6 {
		return g, fmt.Errorf("%d fields, want 6", len(f))
	}
	// A model name may itself contain commas: it is everything between
	// the index and the last four fields.
	model := strings.Join(f[1:len(f)-4], ",")
	f = append([]string{f[0], model}, f[len(f)-4:]...)
	for i := range f {
		f[i] = strings.TrimSpace(f[i])
	}

	idx, err := strconv.Atoi(f[0])
	if err != nil || idx < 0 {
		return g, fmt.Errorf("index %q is not a number", f[0])
	}
	g.Index = idx
	g.Model = sanitizeModel(f[1])
	if g.Model == "" {
		return g, errors.New("empty GPU name")
	}
	util, ok, err := nvidiaNumber(f[2])
	if err != nil {
		return g, fmt.Errorf("utilization: %w", err)
	}
	if ok {
		g.UtilizationPercent = clampPercent(util)
	}
	used, _, err := nvidiaNumber(f[3])
	if err != nil {
		return g, fmt.Errorf("memory.used: %w", err)
	}
	total, _, err := nvidiaNumber(f[4])
	if err != nil {
		return g, fmt.Errorf("memory.total: %w", err)
	}
	g.MemoryTotalMiB = toUint(total)
	g.MemoryUsedMiB = min(toUint(used), g.MemoryTotalMiB)
	temp, ok, err := nvidiaNumber(f[5])
	if err != nil {
		return g, fmt.Errorf("temperature: %w", err)
	}
	if ok && temp >= -100 && temp <= 200 {
		g.TemperatureC = &temp
	}
	return g, nil
}

// nvidiaNumber parses one numeric field; ok is false for the markers of a
// value nvidia-smi could not read.
func nvidiaNumber(s string) (v float64, ok bool, err error) {
	switch strings.ToLower(strings.Trim(s, "[]")) {
	case "n/a", "not supported", "unknown error", "insufficient permissions", "":
		return 0, false, nil
	}
	v, err = strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0, false, fmt.Errorf("%q is not a number", s)
	}
	return v, true, nil
}

func toUint(f float64) uint64 {
	if f <= 0 {
		return 0
	}
	if f >= math.MaxUint64 {
		return math.MaxUint64
	}
	return uint64(f)
}

func clampPercent(f float64) float64 {
	switch {
	case math.IsNaN(f) || f < 0:
		return 0
	case f > 100:
		return 100
	}
	return f
}

func clampLoad(f float64) float64 {
	switch {
	case math.IsNaN(f) || f < 0:
		return 0
	case f > 1e6:
		return 1e6
	}
	return f
}

// sanitizeModel drops control characters and cuts the name to what
// fleet.Metrics.Validate accepts, on a character boundary.
func sanitizeModel(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r == utf8.RuneError {
			return -1
		}
		return r
	}, s)
	s = strings.TrimSpace(s)
	for len(s) > fleet.MaxGPUModelLen {
		_, size := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-size]
	}
	return s
}
