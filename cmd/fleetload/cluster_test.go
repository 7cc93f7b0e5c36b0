package main

import (
	"strings"
	"testing"
	"time"
)

func TestParseProcIO(t *testing.T) {
	const in = "rchar: 123456\nwchar: 7890\nsyscr: 12\nsyscw: 3\nread_bytes: 0\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n"
	got, err := parseProcIO(in)
	if err != nil {
		t.Fatal(err)
	}
	if got != (procIO{RChar: 123456, WChar: 7890}) {
		t.Fatalf("got %+v", got)
	}
	if _, err := parseProcIO("syscr: 1\n"); err == nil {
		t.Fatal("no error without rchar and wchar")
	}
	if _, err := parseProcIO("rchar: x\nwchar: 1\n"); err == nil {
		t.Fatal("no error for a malformed number")
	}
}

func TestParseProm(t *testing.T) {
	const in = `# HELP etcd_mvcc_txn_total Total number of txns seen by this member.
# TYPE etcd_mvcc_txn_total counter
etcd_mvcc_txn_total 1800
etcd_server_proposals_committed_total 601
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.001"} 12
etcd_disk_wal_fsync_duration_seconds_count 230
etcd_mvcc_db_total_size_in_bytes 9.437184e+06
`
	got := parseProm(strings.NewReader(in), etcdFigures)
	want := promValues{"etcd_mvcc_txn_total": 1800, "etcd_server_proposals_committed_total": 601,
		"etcd_disk_wal_fsync_duration_seconds_count": 230, "etcd_mvcc_db_total_size_in_bytes": 9437184}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if d := got.delta(promValues{"etcd_mvcc_txn_total": 2000}, "etcd_mvcc_txn_total"); d != 200 {
		t.Errorf("delta = %v", d)
	}
}

// The reconnection backoff is the real agent's: 1–2 s first, then a ceiling
// doubling up to 30 s.
func TestBackoffDelay(t *testing.T) {
	for n, hi := range []time.Duration{2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second, 30 * time.Second} {
		for range 200 {
			if d := backoffDelay(n); d < time.Second || d > hi {
				t.Fatalf("delay(%d) = %s, want within [1s, %s]", n, d, hi)
			}
		}
	}
}

func TestMergeMembers(t *testing.T) {
	h := newHistogram()
	h.record(time.Millisecond)
	var w windowResult
	w.mergeMembers([]memberWindow{{Hist: h.wire(), Acked: 1, BytesIn: 10}})
	w.mergeMembers([]memberWindow{{Hist: h.wire(), Acked: 2, BytesOut: 5}, {Acked: 7}})
	if len(w.Members) != 2 || w.Members[0].Acked != 3 || w.Members[0].Hist.N != 2 ||
		w.Members[0].BytesIn != 10 || w.Members[0].BytesOut != 5 || w.Members[1].Acked != 7 {
		t.Fatalf("got %+v", w.Members)
	}
}

func TestLogMsg(t *testing.T) {
	for in, want := range map[string]string{
		`time=2026-01-02T03:04:05Z level=WARN msg="recording session start failed" node_id=node_x error="context deadline exceeded"` + "\n": "recording session start failed",
		`time=2026-01-02T03:04:05Z level=WARN msg=plain node_id=x`:                                                                          "plain",
		"panic: boom": "panic: boom",
		"   ":         "",
	} {
		if got := logMsg(in); got != want {
			t.Errorf("logMsg(%q) = %q, want %q", in, got, want)
		}
	}
}
