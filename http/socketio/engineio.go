package socketio

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
)

// engineType is the type of an Engine.IO packet: the first character of its
// text encoding.
type engineType byte

// Engine.IO v4 packet types.
const (
	engineOpen    engineType = '0'
	engineClose   engineType = '1'
	enginePing    engineType = '2'
	enginePong    engineType = '3'
	engineMessage engineType = '4'
	engineUpgrade engineType = '5'
	engineNoop    engineType = '6'
)

// Protocol constants of Engine.IO v4.
const (
	// engineVersion is the only value of the EIO query parameter we serve.
	engineVersion = "4"
	// recordSeparator joins the packets of one polling payload.
	recordSeparator = '\x1e'
	// binaryPrefix marks a base64-encoded binary message in a polling payload.
	binaryPrefix = 'b'
	// probe is the data of the ping/pong pair that tests a WebSocket before
	// an upgrade.
	probe = "probe"
)

// Engine.IO error codes, answered as {"code":N,"message":"..."} with HTTP
// 400 (403 for errForbidden).
const (
	errUnknownTransport   = 0
	errUnknownSID         = 1
	errBadHandshakeMethod = 2
	errBadRequest         = 3
	errForbidden          = 4
	errUnsupportedVersion = 5
)

var engineErrorMessages = map[int]string{
	errUnknownTransport:   "Transport unknown",
	errUnknownSID:         "Session ID unknown",
	errBadHandshakeMethod: "Bad handshake method",
	errBadRequest:         "Bad request",
	errForbidden:          "Forbidden",
	errUnsupportedVersion: "Unsupported protocol version",
}

// Transport names of the transport query parameter.
const (
	transportPolling   = "polling"
	transportWebSocket = "websocket"
)

// errMalformed is wrapped by every decoding error of either protocol.
var errMalformed = errors.New("malformed packet")

// enginePacket is one decoded Engine.IO packet. A binary message (a binary
// WebSocket message, or a 'b'-prefixed polling record) has typ
// engineMessage and binary set.
type enginePacket struct {
	typ    engineType
	data   []byte
	binary bool
}

// decodeEnginePacket decodes the text encoding of one Engine.IO packet: a
// WebSocket text message or one record of a polling payload.
func decodeEnginePacket(b []byte) (enginePacket, error) {
	if len(b) == 0 {
		return enginePacket{}, fmt.Errorf("%w: empty engine.io packet", errMalformed)
	}
	if b[0] == binaryPrefix {
		data := make([]byte, base64.StdEncoding.DecodedLen(len(b)-1))
		n, err := base64.StdEncoding.Decode(data, b[1:])
		if err != nil {
			return enginePacket{}, fmt.Errorf("%w: binary record: %v", errMalformed, err)
		}
		return enginePacket{typ: engineMessage, data: data[:n], binary: true}, nil
	}
	t := engineType(b[0])
	if t < engineOpen || t > engineNoop {
		return enginePacket{}, fmt.Errorf("%w: engine.io packet type %q", errMalformed, b[0])
	}
	return enginePacket{typ: t, data: b[1:]}, nil
}

// encodeEnginePacket returns the text encoding of a packet.
func encodeEnginePacket(p enginePacket) string {
	if p.binary {
		return string(binaryPrefix) + base64.StdEncoding.EncodeToString(p.data)
	}
	return string(rune(p.typ)) + string(p.data)
}

// decodePayload splits a polling request body into its packets. An empty
// body or any malformed record makes the whole payload malformed, as in the
// reference parser.
func decodePayload(body []byte) ([]enginePacket, error) {
	records := bytes.Split(body, []byte{recordSeparator})
	packets := make([]enginePacket, 0, len(records))
	for i, rec := range records {
		p, err := decodeEnginePacket(rec)
		if err != nil {
			return nil, fmt.Errorf("record %d: %w", i, err)
		}
		packets = append(packets, p)
	}
	return packets, nil
}

// encodePayload joins encoded packets into one polling response body.
func encodePayload(packets []string) string {
	return strings.Join(packets, string(rune(recordSeparator)))
}
