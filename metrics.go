package fleet

import (
	"math"
	"strings"
)

// MaxGPUsReported bounds the GPUs one heartbeat may describe.
const MaxGPUsReported = 64

// Metrics is what an agent reports of its machine in each heartbeat; the
// latest one is the node's metrics summary.
type Metrics struct {
	CPUPercent       float64 `json:"cpu_percent"`
	MemoryUsedBytes  uint64  `json:"memory_used_bytes"`
	MemoryTotalBytes uint64  `json:"memory_total_bytes"`
	DiskUsedBytes    uint64  `json:"disk_used_bytes"`
	DiskTotalBytes   uint64  `json:"disk_total_bytes"`
	Load1            float64 `json:"load1"`
	Load5            float64 `json:"load5"`
	Load15           float64 `json:"load15"`
	GPUs             []GPU   `json:"gpus,omitempty"`
}

// GPU is one GPU's state in a heartbeat.
type GPU struct {
	Index              int      `json:"index"`
	Model              string   `json:"model"`
	UtilizationPercent float64  `json:"utilization_percent"`
	MemoryUsedMiB      uint64   `json:"memory_used_mib"`
	MemoryTotalMiB     uint64   `json:"memory_total_mib"`
	TemperatureC       *float64 `json:"temperature_c,omitempty"`
}

// Validate reports whether m is plausible enough to show to renters.
func (m *Metrics) Validate() error {
	var v ValidationError
	if !percent(m.CPUPercent) {
		v.Add("cpu_percent", "must be between 0 and 100")
	}
	if m.MemoryUsedBytes > m.MemoryTotalBytes {
		v.Add("memory_used_bytes", "must not exceed memory_total_bytes")
	}
	if m.DiskUsedBytes > m.DiskTotalBytes {
		v.Add("disk_used_bytes", "must not exceed disk_total_bytes")
	}
	for _, l := range []float64{m.Load1, m.Load5, m.Load15} {
		if math.IsNaN(l) || l < 0 || l > 1e6 {
			v.Add("load", "must be between 0 and 1000000")
		}
	}
	if len(m.GPUs) > MaxGPUsReported {
		v.Add("gpus", "at most 64 GPUs")
	}
	for _, g := range m.GPUs {
		if !percent(g.UtilizationPercent) {
			v.Add("gpus.utilization_percent", "must be between 0 and 100")
		}
		if len(g.Model) > MaxGPUModelLen || strings.ContainsFunc(g.Model, isControl) {
			v.Add("gpus.model", "must be printable text of at most 64 characters")
		}
		if g.MemoryUsedMiB > g.MemoryTotalMiB {
			v.Add("gpus.memory_used_mib", "must not exceed memory_total_mib")
		}
		if t := g.TemperatureC; t != nil && (math.IsNaN(*t) || *t < -100 || *t > 200) {
			v.Add("gpus.temperature_c", "must be between -100 and 200")
		}
	}
	return v.Err()
}

func percent(f float64) bool { return !math.IsNaN(f) && f >= 0 && f <= 100 }
