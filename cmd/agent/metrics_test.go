package main

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"testing"

	"github.com/distributedcompute/fleet"
)

func ptr(f float64) *float64 { return &f }

func TestParseNvidiaSMI(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []fleet.GPU
		wantErr bool
	}{
		{name: "no output", in: "", want: nil},
		{
			name: "two GPUs",
			in: "0, NVIDIA GeForce RTX 4090, 37, 1024, 24564, 45\n" +
				"1, NVIDIA A100-SXM4-80GB, 100, 81000, 81920, 71\n",
			want: []fleet.GPU{
				{Index: 0, Model: "NVIDIA GeForce RTX 4090", UtilizationPercent: 37, MemoryUsedMiB: 1024, MemoryTotalMiB: 24564, TemperatureC: ptr(45)},
				{Index: 1, Model: "NVIDIA A100-SXM4-80GB", UtilizationPercent: 100, MemoryUsedMiB: 81000, MemoryTotalMiB: 81920, TemperatureC: ptr(71)},
			},
		},
		{
			name: "CRLF and blank lines",
			in:   "\r\n0, Tesla T4, 0, 0, 15360, 30\r\n\r\n",
			want: []fleet.GPU{{Index: 0, Model: "Tesla T4", MemoryTotalMiB: 15360, TemperatureC: ptr(30)}},
		},
		{
			name: "N/A temperature is omitted",
			in:   "0, NVIDIA H100 PCIe, 12, 100, 81559, [N/A]\n",
			want: []fleet.GPU{{Index: 0, Model: "NVIDIA H100 PCIe", UtilizationPercent: 12, MemoryUsedMiB: 100, MemoryTotalMiB: 81559}},
		},
		{
			name: "not supported fields are zero",
			in:   "0, NVIDIA GeForce GT 710, [Not Supported], [N/A], [N/A], [Not Supported]\n",
			want: []fleet.GPU{{Index: 0, Model: "NVIDIA GeForce GT 710"}},
		},
		{
			name: "bare N/A",
			in:   "0, Some GPU, N/A, 10, 20, N/A\n",
			want: []fleet.GPU{{Index: 0, Model: "Some GPU", MemoryUsedMiB: 10, MemoryTotalMiB: 20}},
		},
		{
			name: "comma in the model name",
			in:   "0, Vendor, Model X, 5, 1, 2, 40\n",
			want: []fleet.GPU{{Index: 0, Model: "Vendor, Model X", UtilizationPercent: 5, MemoryUsedMiB: 1, MemoryTotalMiB: 2, TemperatureC: ptr(40)}},
		},
		{
			name: "out of range values are clamped",
			in:   "0, Odd GPU, 140, 900, 800, 500\n",
			want: []fleet.GPU{{Index: 0, Model: "Odd GPU", UtilizationPercent: 100, MemoryUsedMiB: 800, MemoryTotalMiB: 800}},
		},
		{
			name: "fractional values",
			in:   "0, Odd GPU, 12.5, 10.7, 20.2, 44.5\n",
			want: []fleet.GPU{{Index: 0, Model: "Odd GPU", UtilizationPercent: 12.5, MemoryUsedMiB: 10, MemoryTotalMiB: 20, TemperatureC: ptr(44.5)}},
		},
		{
			name:    "too few fields",
			in:      "0, Tesla T4, 0\n",
			wantErr: true,
		},
		{
			name:    "error text from nvidia-smi",
			in:      "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n",
			wantErr: true,
		},
		{
			name:    "bad index",
			in:      "x, Tesla T4, 0, 0, 15360, 30\n",
			wantErr: true,
		},
		{
			name:    "bad number",
			in:      "0, Tesla T4, lots, 0, 15360, 30\n",
			wantErr: true,
		},
		{
			name:    "empty name",
			in:      "0, , 0, 0, 15360, 30\n",
			wantErr: true,
		},
		{
			name: "malformed line among good ones",
			in: "0, Tesla T4, 1, 2, 15360, 30\n" +
				"garbage\n" +
				"2, Tesla T4, 3, 4, 15360, 31\n",
			want: []fleet.GPU{
				{Index: 0, Model: "Tesla T4", UtilizationPercent: 1, MemoryUsedMiB: 2, MemoryTotalMiB: 15360, TemperatureC: ptr(30)},
				{Index: 2, Model: "Tesla T4", UtilizationPercent: 3, MemoryUsedMiB: 4, MemoryTotalMiB: 15360, TemperatureC: ptr(31)},
			},
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseNvidiaSMI(tt.in)
			if (err != nil) != tt.wantErr {
				t.Errorf("err = %v, want error: %v", err, tt.wantErr)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got  %s\nwant %s", fmtGPUs(got), fmtGPUs(tt.want))
			}
			m := fleet.Metrics{GPUs: got}
			if err := m.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

func TestParseNvidiaSMILimits(t *testing.T) {
	long := strings.Repeat("é", 50) // 100 bytes
	var b strings.Builder
	for i := range fleet.MaxGPUsReported + 3 {
		fmt.Fprintf(&b, "%d, %s\x01, 1, 1, 2, 30\n", i, long)
	}
	got, err := parseNvidiaSMI(b.String())
	if err == nil {
		t.Error("no error for too many GPUs")
	}
	if len(got) != fleet.MaxGPUsReported {
		t.Fatalf("got %d GPUs, want %d", len(got), fleet.MaxGPUsReported)
	}
	m := fleet.Metrics{GPUs: got}
	if err := m.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	if g := got[0].Model; len(g) > fleet.MaxGPUModelLen || strings.ContainsRune(g, '\x01') || !strings.HasPrefix(g, "éé") {
		t.Errorf("model = %q", g)
	}
}

func fmtGPUs(gs []fleet.GPU) string {
	var b strings.Builder
	for _, g := range gs {
		temp := "nil"
		if g.TemperatureC != nil {
			temp = fmt.Sprint(*g.TemperatureC)
		}
		fmt.Fprintf(&b, "{%d %q %v %d/%d %s} ", g.Index, g.Model, g.UtilizationPercent, g.MemoryUsedMiB, g.MemoryTotalMiB, temp)
	}
	return b.String()
}

func TestCollect(t *testing.T) {
	c := newCollector(slog.New(slog.NewTextHandler(t.Output(), nil)))
	for range 2 {
		m := c.collect(context.Background())
		if err := m.Validate(); err != nil {
			t.Fatalf("Validate(%+v): %v", m, err)
		}
		if m.MemoryTotalBytes == 0 || m.DiskTotalBytes == 0 {
			t.Errorf("memory or disk total is zero: %+v", m)
		}
	}
}

func TestClamp(t *testing.T) {
	nan := func() float64 { var z float64; return z / z }()
	for _, tt := range []struct{ in, percent, load float64 }{
		{-1, 0, 0}, {0, 0, 0}, {55.5, 55.5, 55.5}, {100.0001, 100, 100.0001}, {2e6, 100, 1e6}, {nan, 0, 0},
	} {
		if got := clampPercent(tt.in); got != tt.percent {
			t.Errorf("clampPercent(%v) = %v, want %v", tt.in, got, tt.percent)
		}
		if got := clampLoad(tt.in); got != tt.load {
			t.Errorf("clampLoad(%v) = %v, want %v", tt.in, got, tt.load)
		}
	}
}
