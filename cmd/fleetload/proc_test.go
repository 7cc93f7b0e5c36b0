package main

import "testing"

func TestParseProcStat(t *testing.T) {
	// Fields after the name: state ppid pgrp session tty_nr tpgid flags
	// minflt cminflt majflt cmajflt utime stime ...
	const tail = " S 1 100 100 0 -1 4194560 5000 0 12 0 1234 567 0 0 20 0 9 0 42 1000000 300 18446744073709551615"
	tests := []struct {
		name    string
		in      string
		want    procStat
		wantErr bool
	}{
		{"plain", "4242 (coordinator)" + tail, procStat{UTime: 1234, STime: 567}, false},
		{"name with spaces", "4242 (my coordinator)" + tail, procStat{UTime: 1234, STime: 567}, false},
		{"name with parentheses", "4242 (a) b (c))" + tail, procStat{UTime: 1234, STime: 567}, false},
		{"trailing newline", "1 (init)" + tail + "\n", procStat{UTime: 1234, STime: 567}, false},
		{"no name", "4242 coordinator S 1", procStat{}, true},
		{"too short", "4242 (x) S 1 2 3", procStat{}, true},
		{"not a number", "4242 (x) S 1 100 100 0 -1 4194560 5000 0 12 0 abc 567 0", procStat{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcStat(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseProcStatus(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    memStatus
		wantErr bool
	}{
		{"full", "Name:\tcoordinator\nVmHWM:\t  9000 kB\nVmRSS:\t    8192 kB\nRssAnon:\t    6144 kB\nRssFile:\t    2048 kB\nThreads:\t7\n",
			memStatus{RSS: 8192 << 10, RSSAnon: 6144 << 10, RSSFile: 2048 << 10}, false},
		{"only VmRSS", "VmRSS:\t100 kB\n", memStatus{RSS: 100 << 10}, false},
		{"no VmRSS", "Name:\tzombie\nState:\tZ (zombie)\n", memStatus{}, true},
		{"bad unit", "VmRSS:\t100 MB\n", memStatus{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcStatus(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseMachineCPU(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    machineCPU
		wantErr bool
	}{
		{"ten fields", "cpu  152077 5 53297 559240 2712 1 7282 243 0 0", machineCPU{Busy: 152077 + 5 + 53297, Idle: 559240 + 2712, IRQ: 1 + 7282, Steal: 243}, false},
		{"eight fields", "cpu 1 2 3 4 5 6 7 8", machineCPU{Busy: 6, Idle: 9, IRQ: 13, Steal: 8}, false},
		{"a single CPU's line", "cpu0 1 2 3 4 5 6 7 8", machineCPU{}, true},
		{"too few fields", "cpu 1 2 3 4", machineCPU{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseMachineCPU(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}
