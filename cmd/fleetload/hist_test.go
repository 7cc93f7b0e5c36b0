package main

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

func TestHistogramPercentiles(t *testing.T) {
	uniform := func(lo, hi time.Duration) []time.Duration {
		var v []time.Duration
		for d := lo; d <= hi; d += (hi - lo) / 999 {
			v = append(v, d)
		}
		return v
	}
	tests := []struct {
		name   string
		values []time.Duration
		q      float64
		want   time.Duration
		step   time.Duration // spacing of the values near want: the rank's slack
	}{
		{"single value", []time.Duration{3 * time.Millisecond}, 0.5, 3 * time.Millisecond, 0},
		{"single value, p99", []time.Duration{3 * time.Millisecond}, 0.99, 3 * time.Millisecond, 0},
		{"small values are exact", []time.Duration{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 0.5, 5, 0},
		{"p0 is the min", []time.Duration{10, 20, 30}, 0, 10, 0},
		{"p100 is the max", []time.Duration{10, 20, 30}, 1, 30, 0},
		{"uniform 1..1000 ms, p50", uniform(time.Millisecond, time.Second), 0.5, 500 * time.Millisecond, time.Millisecond},
		{"uniform 1..1000 ms, p99", uniform(time.Millisecond, time.Second), 0.99, 990 * time.Millisecond, time.Millisecond},
		{"one outlier leaves p50 alone", append(uniform(time.Millisecond, 2*time.Millisecond), time.Minute), 0.5, 1500 * time.Microsecond, time.Microsecond},
		{"one outlier in 1001 is above p99", append(uniform(time.Millisecond, 2*time.Millisecond), time.Minute), 0.99, 1990 * time.Microsecond, time.Microsecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHistogram()
			for _, v := range tt.values {
				h.record(v)
			}
			got := h.percentile(tt.q)
			// The histogram keeps 1/128 relative precision, and rounding
			// the rank may move the answer by a step.
			tol := time.Duration(float64(tt.want)/128) + tt.step + 1
			if math.Abs(float64(got-tt.want)) > float64(tol) {
				t.Errorf("percentile(%v) = %v, want %v ± %v", tt.q, got, tt.want, tol)
			}
		})
	}
}

func TestHistogramEmpty(t *testing.T) {
	if got := newHistogram().percentile(0.99); got != 0 {
		t.Fatalf("empty histogram p99 = %v, want 0", got)
	}
}

// Merging the histograms of parts, through their wire form, gives the
// histogram of the whole, as when workers report to the parent.
func TestHistogramMergeWire(t *testing.T) {
	whole, parts := newHistogram(), []*histogram{newHistogram(), newHistogram(), newHistogram()}
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 30_000 {
		d := time.Duration(r.ExpFloat64() * float64(2*time.Millisecond))
		whole.record(d)
		parts[i%3].record(d)
	}
	merged := newHistogram()
	for _, p := range parts {
		merged.merge(p.wire().histogram())
	}
	for _, q := range []float64{0, 0.5, 0.9, 0.99, 0.999, 1} {
		if a, b := whole.percentile(q), merged.percentile(q); a != b {
			t.Errorf("q=%v: whole %v, merged %v", q, a, b)
		}
	}
	if whole.n != merged.n || whole.min != merged.min || whole.max != merged.max {
		t.Errorf("whole n/min/max %d/%v/%v, merged %d/%v/%v", whole.n, whole.min, whole.max, merged.n, merged.min, merged.max)
	}
}

func TestBucketBounds(t *testing.T) {
	for _, v := range []uint64{0, 1, 255, 256, 257, 1000, 123456789, 1 << 40, math.MaxUint64} {
		i := bucketOf(v)
		lo, hi := bucketBounds(i)
		if v < lo || v > hi || i >= numBuckets {
			t.Errorf("value %d: bucket %d [%d, %d]", v, i, lo, hi)
		}
		if hi-lo > hi/128 {
			t.Errorf("value %d: bucket [%d, %d] is wider than 1/128", v, lo, hi)
		}
	}
}

// The recorder sits on every ack's path in the load generator; it must
// stay far cheaper than the coordinator's work per heartbeat.
func BenchmarkHistogramRecord(b *testing.B) {
	h := newHistogram()
	r := rand.New(rand.NewPCG(1, 2))
	v := make([]time.Duration, 1024)
	for i := range v {
		v[i] = time.Duration(r.ExpFloat64() * float64(time.Millisecond))
	}
	b.ResetTimer()
	for i := range b.N {
		h.record(v[i%len(v)])
	}
}
