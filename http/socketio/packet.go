package socketio

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// packetType is the type of a Socket.IO packet.
type packetType byte

// Socket.IO v5 packet types.
const (
	packetConnect      packetType = 0
	packetDisconnect   packetType = 1
	packetEvent        packetType = 2
	packetAck          packetType = 3
	packetConnectError packetType = 4
	packetBinaryEvent  packetType = 5
	packetBinaryAck    packetType = 6
)

// maxAttachments bounds the attachment count of a binary packet, as the
// reference parser does (its maxAttachments defaults to 10).
const maxAttachments = 10

// defaultNamespace is the namespace of a packet that names none.
const defaultNamespace = "/"

// packet is one Socket.IO packet, the data of an Engine.IO message:
// <type>[<attachments>-][<namespace>,][<ack id>][<JSON data>].
type packet struct {
	typ         packetType
	attachments int    // binary packets only; at least 1
	nsp         string // "/" when absent
	id          *uint64
	data        json.RawMessage // nil when absent
}

// decodePacket decodes the text form of a Socket.IO packet. It follows the
// reference parser (socket.io-parser) and also checks that the data fits
// the packet type.
func decodePacket(s []byte) (packet, error) {
	var p packet
	if len(s) == 0 {
		return p, fmt.Errorf("%w: empty socket.io packet", errMalformed)
	}
	if s[0] < '0' || s[0] > '6' {
		return p, fmt.Errorf("%w: socket.io packet type %q", errMalformed, s[0])
	}
	p.typ = packetType(s[0] - '0')
	rest := s[1:]

	if p.typ == packetBinaryEvent || p.typ == packetBinaryAck {
		dash := bytes.IndexByte(rest, '-')
		if dash < 1 {
			return p, fmt.Errorf("%w: binary packet without attachment count", errMalformed)
		}
		n, err := strconv.Atoi(string(rest[:dash]))
		if err != nil || n < 1 || n > maxAttachments || !allDigits(rest[:dash]) {
			return p, fmt.Errorf("%w: attachment count %q", errMalformed, rest[:dash])
		}
		p.attachments = n
		rest = rest[dash+1:]
	}

	p.nsp = defaultNamespace
	if len(rest) > 0 && rest[0] == '/' {
		end := bytes.IndexByte(rest, ',')
		if end < 0 {
			p.nsp, rest = string(rest), nil
		} else {
			p.nsp, rest = string(rest[:end]), rest[end+1:]
		}
	}

	digits := 0
	for digits < len(rest) && rest[digits] >= '0' && rest[digits] <= '9' {
		digits++
	}
	if digits > 0 {
		id, err := strconv.ParseUint(string(rest[:digits]), 10, 64)
		if err != nil {
			return p, fmt.Errorf("%w: ack id %q", errMalformed, rest[:digits])
		}
		p.id = &id
		rest = rest[digits:]
	}

	if len(rest) > 0 {
		if !json.Valid(rest) {
			return p, fmt.Errorf("%w: data is not JSON", errMalformed)
		}
		p.data = json.RawMessage(bytes.Clone(rest))
	}
	if err := checkData(p.typ, p.data); err != nil {
		return p, err
	}
	return p, nil
}

// checkData checks that the data of a packet has the shape its type needs.
func checkData(t packetType, data json.RawMessage) error {
	kind := jsonKind(data)
	ok := false
	switch t {
	case packetConnect:
		ok = kind == 0 || kind == '{'
	case packetDisconnect:
		ok = kind == 0
	case packetConnectError:
		ok = kind == '{' || kind == '"'
	case packetEvent, packetBinaryEvent:
		ok = kind == '['
	case packetAck, packetBinaryAck:
		ok = kind == '['
	}
	if !ok {
		return fmt.Errorf("%w: data does not fit packet type %d", errMalformed, t)
	}
	return nil
}

// jsonKind returns the first non-space byte of valid JSON, 0 for none.
func jsonKind(data json.RawMessage) byte {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 {
		return 0
	}
	return trimmed[0]
}

func allDigits(b []byte) bool {
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// encode returns the text form of the packet.
func (p packet) encode() string {
	var b strings.Builder
	b.WriteByte('0' + byte(p.typ))
	if p.typ == packetBinaryEvent || p.typ == packetBinaryAck {
		b.WriteString(strconv.Itoa(p.attachments))
		b.WriteByte('-')
	}
	if p.nsp != "" && p.nsp != defaultNamespace {
		b.WriteString(p.nsp)
		b.WriteByte(',')
	}
	if p.id != nil {
		b.WriteString(strconv.FormatUint(*p.id, 10))
	}
	b.Write(p.data)
	return b.String()
}

// message returns the Engine.IO message packet that carries p.
func (p packet) message() string {
	return string(rune(engineMessage)) + p.encode()
}

// eventArgs splits the data of an EVENT packet into the event name and the
// raw JSON of its first argument (nil when there is none).
func eventArgs(data json.RawMessage) (string, json.RawMessage, error) {
	var args []json.RawMessage
	if err := json.Unmarshal(data, &args); err != nil {
		return "", nil, fmt.Errorf("%w: event data is not an array", errMalformed)
	}
	if len(args) == 0 || jsonKind(args[0]) != '"' {
		return "", nil, fmt.Errorf("%w: event name is not a string", errMalformed)
	}
	var name string
	if err := json.Unmarshal(args[0], &name); err != nil {
		return "", nil, fmt.Errorf("%w: event name: %v", errMalformed, err)
	}
	if len(args) < 2 {
		return name, nil, nil
	}
	return name, args[1], nil
}
