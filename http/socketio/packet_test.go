package socketio

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"
)

func id(n uint64) *uint64 { return &n }

func TestDecodePacket(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want packet
		err  bool
	}{
		{name: "connect default namespace", in: "0", want: packet{typ: packetConnect, nsp: "/"}},
		{name: "connect", in: "0/fleet,", want: packet{typ: packetConnect, nsp: "/fleet"}},
		{name: "connect without comma", in: "0/fleet", want: packet{typ: packetConnect, nsp: "/fleet"}},
		{name: "connect with auth", in: `0/fleet,{"token":"x"}`, want: packet{typ: packetConnect, nsp: "/fleet", data: json.RawMessage(`{"token":"x"}`)}},
		{name: "disconnect", in: "1/fleet,", want: packet{typ: packetDisconnect, nsp: "/fleet"}},
		{name: "event", in: `2/fleet,["heartbeat",{"cpu":1}]`, want: packet{typ: packetEvent, nsp: "/fleet", data: json.RawMessage(`["heartbeat",{"cpu":1}]`)}},
		{name: "event with ack id", in: `2/fleet,12["heartbeat"]`, want: packet{typ: packetEvent, nsp: "/fleet", id: id(12), data: json.RawMessage(`["heartbeat"]`)}},
		{name: "event default namespace", in: `27["a",1]`, want: packet{typ: packetEvent, nsp: "/", id: id(7), data: json.RawMessage(`["a",1]`)}},
		{name: "ack", in: `3/fleet,5[{"ok":true}]`, want: packet{typ: packetAck, nsp: "/fleet", id: id(5), data: json.RawMessage(`[{"ok":true}]`)}},
		{name: "connect error", in: `4/other,{"message":"Invalid namespace"}`, want: packet{typ: packetConnectError, nsp: "/other", data: json.RawMessage(`{"message":"Invalid namespace"}`)}},
		{name: "binary event", in: `51-/fleet,["up",{"_placeholder":true,"num":0}]`, want: packet{typ: packetBinaryEvent, attachments: 1, nsp: "/fleet", data: json.RawMessage(`["up",{"_placeholder":true,"num":0}]`)}},
		{name: "binary ack", in: `62-/fleet,3[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]`, want: packet{typ: packetBinaryAck, attachments: 2, nsp: "/fleet", id: id(3), data: json.RawMessage(`[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]`)}},
		{name: "max uint64 id", in: `2/fleet,18446744073709551615["a"]`, want: packet{typ: packetEvent, nsp: "/fleet", id: id(18446744073709551615), data: json.RawMessage(`["a"]`)}},

		{name: "empty", in: "", err: true},
		{name: "type 7", in: "7", err: true},
		{name: "type letter", in: "x", err: true},
		{name: "id overflow", in: `2/fleet,18446744073709551616["a"]`, err: true},
		{name: "event without data", in: "2/fleet,", err: true},
		{name: "event object", in: `2/fleet,{"a":1}`, err: true},
		{name: "event bad json", in: `2/fleet,["a"`, err: true},
		{name: "event trailing garbage", in: `2/fleet,["a"]x`, err: true},
		{name: "connect array", in: `0/fleet,[1]`, err: true},
		{name: "disconnect with data", in: `1/fleet,{}`, err: true},
		{name: "ack object", in: `3/fleet,1{}`, err: true},
		{name: "binary without count", in: `5/fleet,["a"]`, err: true},
		{name: "binary zero attachments", in: `50-/fleet,["a"]`, err: true},
		{name: "binary too many attachments", in: `5999-/fleet,["a"]`, err: true},
		{name: "binary sign", in: `5+1-/fleet,["a"]`, err: true},
		{name: "namespace swallowing data", in: `2/fleet["a"]`, err: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodePacket([]byte(tt.in))
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
		})
	}
}

func TestEncodePacket(t *testing.T) {
	tests := []struct {
		p    packet
		want string
	}{
		{packet{typ: packetConnect, nsp: "/fleet", data: json.RawMessage(`{"sid":"abc"}`)}, `0/fleet,{"sid":"abc"}`},
		{packet{typ: packetDisconnect, nsp: "/fleet"}, "1/fleet,"},
		{packet{typ: packetEvent, nsp: "/fleet", data: json.RawMessage(`["welcome",{}]`)}, `2/fleet,["welcome",{}]`},
		{packet{typ: packetAck, nsp: "/fleet", id: id(42), data: json.RawMessage(`[]`)}, "3/fleet,42[]"},
		{packet{typ: packetConnectError, nsp: "/other", data: json.RawMessage(`{"message":"Invalid namespace"}`)}, `4/other,{"message":"Invalid namespace"}`},
		{packet{typ: packetEvent, nsp: "/", data: json.RawMessage(`["a"]`)}, `2["a"]`},
		{packet{typ: packetBinaryEvent, attachments: 1, nsp: "/fleet", data: json.RawMessage(`["a"]`)}, `51-/fleet,["a"]`},
	}
	for _, tt := range tests {
		if got := tt.p.encode(); got != tt.want {
			t.Errorf("encode %+v = %q, want %q", tt.p, got, tt.want)
		}
		back, err := decodePacket([]byte(tt.want))
		if err != nil || !reflect.DeepEqual(back, tt.p) {
			t.Errorf("decode %q = %+v, %v; want %+v", tt.want, back, err, tt.p)
		}
	}
}

func TestEventArgs(t *testing.T) {
	tests := []struct {
		in   string
		name string
		data string
		err  bool
	}{
		{in: `["heartbeat",{"cpu":1}]`, name: "heartbeat", data: `{"cpu":1}`},
		{in: `["heartbeat"]`, name: "heartbeat"},
		{in: `["heartbeat",null,2]`, name: "heartbeat", data: `null`},
		{in: `[ "a" , [1] ]`, name: "a", data: `[1]`},
		{in: `["caf\u00e9"]`, name: "café"},
		{in: `[]`, err: true},
		{in: `[1,{}]`, err: true},
		{in: `[null]`, err: true},
		{in: `{"a":1}`, err: true},
	}
	for _, tt := range tests {
		name, data, err := eventArgs(json.RawMessage(tt.in))
		if tt.err {
			if !errors.Is(err, errMalformed) {
				t.Errorf("eventArgs(%s): err = %v, want malformed", tt.in, err)
			}
			continue
		}
		if err != nil || name != tt.name || string(data) != tt.data {
			t.Errorf("eventArgs(%s) = %q, %q, %v; want %q, %q", tt.in, name, data, err, tt.name, tt.data)
		}
		if tt.data == "" && data != nil {
			t.Errorf("eventArgs(%s): data = %q, want nil", tt.in, data)
		}
	}
}

func FuzzDecodePacket(f *testing.F) {
	for _, seed := range []string{
		"", "0", "0/fleet,", `0/fleet,{"token":"x"}`, "1/fleet,", `2/fleet,["heartbeat",{"cpu":1}]`,
		`2/fleet,12["heartbeat"]`, `3/fleet,5[]`, `4/other,{"message":"Invalid namespace"}`,
		`51-/fleet,["up",{"_placeholder":true,"num":0}]`, `62-/fleet,3[]`, `2/fleet,99999999999999999999["a"]`,
		`2/fleet["a"]`, "5-", "2/", `2/,["a"]`, `0 {}`, "7",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		p, err := decodePacket(in)
		if err != nil {
			if !errors.Is(err, errMalformed) {
				t.Fatalf("error does not wrap errMalformed: %v", err)
			}
			return
		}
		if p.typ == packetEvent {
			_, _, _ = eventArgs(p.data)
		}
		again, err := decodePacket([]byte(p.encode()))
		if err != nil {
			t.Fatalf("decode(encode(%+v)) = %v", p, err)
		}
		if !reflect.DeepEqual(again, p) {
			t.Fatalf("round trip: %+v, want %+v", again, p)
		}
	})
}
