// Drives the real socket.io-client against a coordinator and prints what
// happens as JSON lines on stdout, for the Go interop test to assert on.
//
// Usage: node client.mjs <url>        (e.g. http://127.0.0.1:3000/fleet)
// Environment:
//   HOST_API_KEY  the host API key, sent as "Authorization: Bearer <key>"
//   TRANSPORTS    comma-separated transports option; unset: the client's default
//   EMITS         heartbeats to emit with an ack after the welcome (default 1)
//   WAIT_UPGRADE  "1": emit only once the transport was upgraded to websocket
//   LINGER_MS     keep watching this long after the end, to see reconnects (default 0)
//   DEADLINE_MS   give up (event "deadline") after this long (default 20000)
//   KEEP_ALIVE_MS heartbeat every this many ms after the welcome, as an agent
//                 does, alternating with and without an ack, until killed
//
// Lines: open, upgrade, connect, welcome, ack, done, disconnect,
// connect_error, reconnect_attempt, deadline, exit; each with the transport
// in use where there is one.
import { io } from "socket.io-client";

const url = process.argv[2];
const HOST_API_KEY = process.env.HOST_API_KEY ?? "";
const emits = Number(process.env.EMITS ?? "1");
const waitUpgrade = process.env.WAIT_UPGRADE === "1";
const lingerMs = Number(process.env.LINGER_MS ?? "0");
const deadlineMs = Number(process.env.DEADLINE_MS ?? "20000");
const keepAliveMs = Number(process.env.KEEP_ALIVE_MS ?? "0");

function print(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

let socket;
if (!process.env.TRANSPORTS) {
  // The auth guide's snippet, as hosts write it.
  socket = io(url, {
    extraHeaders: {
      Authorization: `Bearer ${HOST_API_KEY}`
    }
  });
} else {
  socket = io(url, {
    extraHeaders: {
      Authorization: `Bearer ${HOST_API_KEY}`
    },
    transports: process.env.TRANSPORTS.split(","),
  });
}

const transport = () => socket.io.engine?.transport?.name ?? null;

let finished = false;
function finish() {
  if (finished) return;
  finished = true;
  setTimeout(() => {
    print({ event: "exit" });
    socket.close();
    process.exit(0);
  }, lingerMs);
}

setTimeout(() => {
  print({ event: "deadline" });
  socket.close();
  process.exit(0);
}, deadlineMs).unref();

let upgraded = false;
let welcomed = false;
let emitted = false;

socket.io.on("open", () => {
  const engine = socket.io.engine;
  print({ event: "open", transport: engine.transport.name });
  engine.on("upgrade", (t) => {
    upgraded = true;
    print({ event: "upgrade", transport: t.name });
    maybeEmit();
  });
});
socket.io.on("reconnect_attempt", (attempt) => {
  print({ event: "reconnect_attempt", attempt });
});

socket.on("connect", () => {
  print({ event: "connect", transport: transport() });
});
socket.on("welcome", (data) => {
  welcomed = true;
  print({ event: "welcome", data, transport: transport() });
  maybeEmit();
});
for (const name of ["rental.started", "rental.stopped"]) {
  socket.on(name, (data) => print({ event: name, data, transport: transport() }));
}
socket.on("disconnect", (reason) => {
  print({ event: "disconnect", reason, transport: transport() });
  finish();
});
socket.on("connect_error", (err) => {
  print({ event: "connect_error", message: err.message });
  finish();
});

function keepAlive() {
  let seq = 0;
  const beat = () => {
    const metrics = { cpu_percent: 5, memory_used_bytes: 1024, memory_total_bytes: 4096, load1: 0.5 };
    if (seq++ % 2 === 0) {
      socket.emit("heartbeat", metrics, (data) => print({ event: "ack", data, transport: transport() }));
    } else {
      socket.emit("heartbeat", metrics);
      print({ event: "sent", transport: transport() });
    }
  };
  beat();
  setInterval(beat, keepAliveMs);
}

function maybeEmit() {
  if (emitted || !welcomed || (waitUpgrade && !upgraded)) return;
  emitted = true;
  if (keepAliveMs > 0) {
    keepAlive();
    return;
  }
  let acked = 0;
  if (emits === 0) {
    print({ event: "done" });
    socket.disconnect();
    return;
  }
  for (let i = 0; i < emits; i++) {
    socket.emit("heartbeat", { seq: i }, (data) => {
      print({ event: "ack", data, transport: transport() });
      if (++acked === emits) {
        print({ event: "done" });
        socket.disconnect();
      }
    });
  }
}
