package socketio

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/distributedcompute/fleet"
)

// handlePackets handles inbound Engine.IO packets in order; false once the
// session is over.
func (s *session) handlePackets(packets []enginePacket) bool {
	s.inMu.Lock()
	defer s.inMu.Unlock()
	for _, p := range packets {
		select {
		case <-s.done:
			return false
		default:
		}
		switch p.typ {
		case engineClose:
			s.destroy(io.EOF)
			return false
		case enginePong:
			s.mu.Lock()
			if s.awaitingPong {
				s.schedulePingLocked(s.cfg.PingInterval, false)
			}
			s.mu.Unlock()
		case engineMessage:
			if p.binary {
				s.onBinary()
			} else {
				s.onPacket(p.data)
			}
		default:
			// open, ping (a v3 heartbeat), upgrade on the live transport and
			// noop mean nothing here.
		}
	}
	return true
}

// onBinary discards a binary message: an attachment of a binary packet, or
// a stray one, which is a bad frame.
func (s *session) onBinary() {
	if s.attachments > 0 {
		s.attachments--
		return
	}
	s.badFrame(fmt.Errorf("%w: binary message outside a binary packet", errMalformed))
}

// onPacket handles one Socket.IO packet from the client.
func (s *session) onPacket(data []byte) {
	// A text packet ends an unfinished binary packet.
	s.attachments = 0
	p, err := decodePacket(data)
	if err != nil {
		s.badFrame(err)
		return
	}
	ns := s.cfg.Namespace
	switch p.typ {
	case packetConnect:
		if p.nsp != ns {
			msg, _ := json.Marshal(map[string]string{"message": "Invalid namespace"})
			s.mu.Lock()
			if !s.closed {
				s.forcePushLocked(packet{typ: packetConnectError, nsp: p.nsp, data: msg}.message())
			}
			s.mu.Unlock()
			return
		}
		s.connect()
	case packetDisconnect:
		if p.nsp == ns {
			s.remoteDisconnect()
		}
	case packetEvent:
		if p.nsp != ns {
			return
		}
		if len(data) > s.cfg.MaxFrameSize {
			s.badFrame(fmt.Errorf("event packet of %d bytes exceeds %d", len(data), s.cfg.MaxFrameSize))
			return
		}
		name, arg, err := eventArgs(p.data)
		if err != nil {
			s.badFrame(err)
			return
		}
		s.deliver(inbound{frame: fleet.Frame{Event: name, Data: arg, Ack: p.id}})
	case packetBinaryEvent, packetBinaryAck:
		s.attachments = p.attachments
		if p.nsp == ns {
			s.badFrame(errors.New("binary packets are not supported"))
		}
	default:
		// ACKs: the server never asks the client for one. CONNECT_ERROR
		// only travels to the client.
	}
}

// connect runs OnConnect for a CONNECT to the namespace. A CONNECT while
// connected, or while closing, is ignored.
func (s *session) connect() {
	s.mu.Lock()
	if s.closed || s.closing || s.conn != nil {
		s.mu.Unlock()
		return
	}
	c := newConn(s)
	s.conn = c
	s.stopConnectTimerLocked()
	s.mu.Unlock()

	err := s.callOnConnect(c)

	s.mu.Lock()
	defer s.mu.Unlock()
	c.replied = true
	if s.closed || s.conn != c {
		return
	}
	sid, _ := json.Marshal(map[string]string{"sid": c.id})
	s.forcePushLocked(packet{typ: packetConnect, nsp: s.cfg.Namespace, data: sid}.message())
	if err != nil {
		s.log.Debug("socket.io connect refused", "err", err)
		c.finishLocked(fmt.Errorf("%w: %w", errRefused, err))
		s.disconnectLocked(refuseCloseDelay)
		return
	}
	c.accepted = true
	for _, pkt := range c.early {
		s.forcePushLocked(pkt)
	}
	c.early = nil
	if c.closeCalled {
		s.disconnectLocked(0)
	}
}

// callOnConnect runs OnConnect; a panic refuses the connect instead of
// leaving the session half-connected.
func (s *session) callOnConnect(c *Conn) (err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("socket.io OnConnect panicked", "panic", r)
			err = fmt.Errorf("socketio: OnConnect panicked: %v", r)
		}
	}()
	return s.srv.onConnect(s.header, c)
}

// disconnectLocked sends DISCONNECT for the namespace and closes the
// session after it, delay after it was delivered at the earliest.
func (s *session) disconnectLocked(delay time.Duration) {
	s.conn = nil
	s.forcePushLocked(packet{typ: packetDisconnect, nsp: s.cfg.Namespace}.message())
	s.beginClosingLocked(delay)
}

// remoteDisconnect ends the namespace connection on the client's DISCONNECT;
// the session stays for a new CONNECT, within connectTimeout.
func (s *session) remoteDisconnect() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil || !s.conn.accepted {
		return
	}
	s.conn.finishLocked(io.EOF)
	s.conn = nil
	s.armConnectTimerLocked()
}

// badFrame reports a bad inbound frame to the connection, if there is one.
func (s *session) badFrame(err error) {
	s.deliver(inbound{err: fmt.Errorf("%w: %w", fleet.ErrBadFrame, err)})
}

// deliver hands an inbound frame to the connection, waiting for room.
func (s *session) deliver(in inbound) {
	s.mu.Lock()
	c := s.conn
	if c == nil || !c.accepted || c.finished {
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	select {
	case c.in <- in:
	case <-c.done:
	}
}
