package socketio

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

func TestDecodeEnginePacket(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want enginePacket
		err  bool
	}{
		{name: "open", in: `0{"sid":"x"}`, want: enginePacket{typ: engineOpen, data: []byte(`{"sid":"x"}`)}},
		{name: "close", in: "1", want: enginePacket{typ: engineClose, data: []byte{}}},
		{name: "ping probe", in: "2probe", want: enginePacket{typ: enginePing, data: []byte("probe")}},
		{name: "pong", in: "3", want: enginePacket{typ: enginePong, data: []byte{}}},
		{name: "message", in: `42/fleet,["a"]`, want: enginePacket{typ: engineMessage, data: []byte(`2/fleet,["a"]`)}},
		{name: "upgrade", in: "5", want: enginePacket{typ: engineUpgrade, data: []byte{}}},
		{name: "noop", in: "6", want: enginePacket{typ: engineNoop, data: []byte{}}},
		{name: "binary", in: "bAQID", want: enginePacket{typ: engineMessage, data: []byte{1, 2, 3}, binary: true}},
		{name: "empty binary", in: "b", want: enginePacket{typ: engineMessage, data: []byte{}, binary: true}},
		{name: "empty", in: "", err: true},
		{name: "type 7", in: "7", err: true},
		{name: "letter", in: "x", err: true},
		{name: "bad base64", in: "b!!!", err: true},
		{name: "unpadded base64", in: "bAQI", err: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeEnginePacket([]byte(tt.in))
			if tt.err {
				if !errors.Is(err, errMalformed) {
					t.Fatalf("decode %q: err = %v, want malformed", tt.in, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("decode %q: %v", tt.in, err)
			}
			if got.typ != tt.want.typ || got.binary != tt.want.binary || !bytes.Equal(got.data, tt.want.data) {
				t.Fatalf("decode %q = %+v, want %+v", tt.in, got, tt.want)
			}
			if enc := encodeEnginePacket(got); enc != tt.in {
				t.Fatalf("encode(decode(%q)) = %q", tt.in, enc)
			}
		})
	}
}

func TestDecodePayload(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []enginePacket
		err  bool
	}{
		{name: "one", in: "3", want: []enginePacket{{typ: enginePong, data: []byte{}}}},
		{
			name: "several",
			in:   "40/fleet,\x1e42/fleet,1[\"heartbeat\",{}]\x1ebAQ==\x1e3",
			want: []enginePacket{
				{typ: engineMessage, data: []byte("0/fleet,")},
				{typ: engineMessage, data: []byte(`2/fleet,1["heartbeat",{}]`)},
				{typ: engineMessage, data: []byte{1}, binary: true},
				{typ: enginePong, data: []byte{}},
			},
		},
		{name: "close", in: "1", want: []enginePacket{{typ: engineClose, data: []byte{}}}},
		{name: "empty body", in: "", err: true},
		{name: "empty record", in: "3\x1e\x1e3", err: true},
		{name: "trailing separator", in: "3\x1e", err: true},
		{name: "bad record", in: "3\x1e9", err: true},
		{name: "bad binary", in: "3\x1eb%%", err: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodePayload([]byte(tt.in))
			if tt.err {
				if !errors.Is(err, errMalformed) {
					t.Fatalf("decode %q: err = %v, want malformed", tt.in, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("decode %q: %v", tt.in, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("decode %q = %+v, want %+v", tt.in, got, tt.want)
			}
			enc := make([]string, len(got))
			for i, p := range got {
				enc[i] = encodeEnginePacket(p)
			}
			if s := encodePayload(enc); s != tt.in {
				t.Fatalf("encode(decode(%q)) = %q", tt.in, s)
			}
		})
	}
}

func TestEncodePayload(t *testing.T) {
	if got := encodePayload([]string{"2", `40/fleet,{"sid":"a"}`}); got != "2\x1e40/fleet,{\"sid\":\"a\"}" {
		t.Fatalf("encodePayload = %q", got)
	}
	if got := encodePayload([]string{"6"}); got != "6" {
		t.Fatalf("encodePayload = %q", got)
	}
}

func FuzzDecodePayload(f *testing.F) {
	for _, seed := range []string{
		"", "1", "2probe", "3", "6", "40/fleet,", "42/fleet,1[\"heartbeat\",{\"cpu\":1}]",
		"40/fleet,\x1e42/fleet,[\"a\"]\x1e3", "bAQID", "b", "b!!", "3\x1e", "\x1e", "451-/fleet,[\"x\",{\"_placeholder\":true,\"num\":0}]\x1ebAQID",
		"9", "4\x00", "0{\"sid\":\"x\"}",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		packets, err := decodePayload(body)
		if err != nil {
			if !errors.Is(err, errMalformed) {
				t.Fatalf("error does not wrap errMalformed: %v", err)
			}
			return
		}
		if len(packets) == 0 {
			t.Fatal("no packets and no error")
		}
		enc := make([]string, len(packets))
		for i, p := range packets {
			enc[i] = encodeEnginePacket(p)
			// Socket.IO decoding of whatever a message carries must not panic.
			if p.typ == engineMessage && !p.binary {
				_, _ = decodePacket(p.data)
			}
		}
		again, err := decodePayload([]byte(encodePayload(enc)))
		if err != nil {
			t.Fatalf("re-encoded payload does not decode: %v", err)
		}
		if len(again) != len(packets) {
			t.Fatalf("round trip: %d packets, want %d", len(again), len(packets))
		}
		for i := range again {
			a, b := again[i], packets[i]
			if a.typ != b.typ || a.binary != b.binary || !bytes.Equal(a.data, b.data) {
				t.Fatalf("round trip packet %d: %+v, want %+v", i, a, b)
			}
		}
	})
}
