package main

import (
	"math/bits"
	"time"
)

// subBucketBits sets the histogram's precision: each power of two is split
// into 2^subBucketBits buckets, so a recorded value is known to within
// 1/128 (under 0.8 %) of itself, whatever its magnitude, in a fixed array.
const subBucketBits = 7

const (
	subBuckets = 1 << subBucketBits
	numBuckets = (64-subBucketBits-1)*subBuckets + 2*subBuckets
)

// histogram is a log-bucketed latency histogram in the manner of
// HdrHistogram: constant relative precision, fixed memory, and merging is
// adding counts, so that worker processes can send theirs to the parent.
// It is not safe for concurrent use.
type histogram struct {
	counts   []uint64
	n        uint64
	min, max time.Duration
}

func newHistogram() *histogram { return &histogram{counts: make([]uint64, numBuckets)} }

// bucketOf maps a value to its bucket. Values below 2^(subBucketBits+1) get
// a bucket each; above that the top subBucketBits+1 bits pick the bucket.
func bucketOf(v uint64) int {
	shift := bits.Len64(v) - (subBucketBits + 1)
	if shift <= 0 {
		return int(v)
	}
	return shift*subBuckets + int(v>>shift)
}

// bucketBounds returns the smallest and largest value of bucket i.
func bucketBounds(i int) (lo, hi uint64) {
	if i < 2*subBuckets {
		return uint64(i), uint64(i)
	}
	shift := i/subBuckets - 1
	mantissa := uint64(i - shift*subBuckets)
	return mantissa << shift, (mantissa+1)<<shift - 1
}

func (h *histogram) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[bucketOf(uint64(d))]++
	if h.n == 0 || d < h.min {
		h.min = d
	}
	if d > h.max {
		h.max = d
	}
	h.n++
}

func (h *histogram) merge(o *histogram) {
	if o == nil || o.n == 0 {
		return
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	if o.max > h.max {
		h.max = o.max
	}
	h.n += o.n
}

// percentile returns the value at quantile q (0..1): the middle of the
// bucket holding the value of that rank, kept within the recorded min and
// max. It is 0 for an empty histogram.
func (h *histogram) percentile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n) + 0.5)
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for i, c := range h.counts {
		if seen += c; seen >= rank {
			lo, hi := bucketBounds(i)
			v := time.Duration(lo + (hi-lo)/2)
			return min(max(v, h.min), h.max)
		}
	}
	return h.max
}

// histogramJSON is a histogram on the wire between a worker and the parent:
// only the buckets in use, as [index, count] pairs.
type histogramJSON struct {
	Buckets [][2]uint64   `json:"buckets"`
	N       uint64        `json:"n"`
	Min     time.Duration `json:"min"`
	Max     time.Duration `json:"max"`
}

func (h *histogram) wire() histogramJSON {
	w := histogramJSON{N: h.n, Min: h.min, Max: h.max}
	for i, c := range h.counts {
		if c > 0 {
			w.Buckets = append(w.Buckets, [2]uint64{uint64(i), c})
		}
	}
	return w
}

func (w histogramJSON) histogram() *histogram {
	h := newHistogram()
	for _, b := range w.Buckets {
		if b[0] < numBuckets {
			h.counts[b[0]] += b[1]
		}
	}
	h.n, h.min, h.max = w.N, w.Min, w.Max
	return h
}
