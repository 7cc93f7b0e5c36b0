// Package socketio is the server side of Engine.IO protocol v4 and
// Socket.IO protocol v5, on gorilla/websocket, for a single namespace: the
// subset the real socket.io-client v4 needs to reach the fleet namespace
// with HTTP long-polling, the upgrade to WebSocket, or a WebSocket alone.
//
// What is served: the Engine.IO handshake, polling (one GET and one POST in
// flight per session, payloads joined by the record separator), the
// probe/upgrade sequence, direct WebSockets, server pings; Socket.IO
// CONNECT, DISCONNECT, EVENT and ACK for the namespace. What is not:
// binary events (read, discarded and reported as fleet.ErrBadFrame),
// other namespaces (CONNECT_ERROR "Invalid namespace"), JSONP, Engine.IO
// v3, connection state recovery.
//
// Decisions where the protocol leaves room:
//   - A second CONNECT to the namespace while connected is ignored (the
//     reference server closes the client); after the client's DISCONNECT
//     the same session may CONNECT again.
//   - A refused connect is answered CONNECT then DISCONNECT, as the product's
//     auth guide requires (the client sees connect then
//     disconnect("io server disconnect") and does not reconnect); the
//     Engine.IO session is closed shortly after, in a separate packet.
//   - Malformed Socket.IO packets are bad frames (reported to the
//     connection, not fatal); malformed Engine.IO payloads close the session,
//     as in the reference server.
//   - A session that does not connect to the namespace within 45 s is closed.
//   - WebSocket origins are checked as gorilla/websocket does by default
//     (same host, or no Origin header as from non-browser agents).
package socketio
