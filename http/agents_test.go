package http

import (
	"encoding/json"
	"testing"

	"github.com/distributedcompute/fleet"
)

func TestAppendFrameMatchesEncodingJSON(t *testing.T) {
	seven := uint64(7)
	for _, f := range []fleet.Frame{
		{Event: "welcome", Data: json.RawMessage(`{"node_id":"n"}`)},
		{Event: "ack", Data: json.RawMessage(`{"accepted":true}`), Ack: &seven},
		{Event: "rental.stopped", Data: json.RawMessage(`{"reason":"a \"quoted\" <reason>"}`)},
	} {
		var got, want any
		if err := json.Unmarshal(appendFrame(nil, f), &got); err != nil {
			t.Fatalf("%+v: invalid JSON: %v", f, err)
		}
		b, _ := json.Marshal(f)
		_ = json.Unmarshal(b, &want)
		gb, _ := json.Marshal(got)
		wb, _ := json.Marshal(want)
		if string(gb) != string(wb) {
			t.Fatalf("appendFrame = %s, encoding/json = %s", gb, wb)
		}
	}
}
