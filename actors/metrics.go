package actors

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var (
	connectedNodes = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "fleet_connected_nodes", Help: "Nodes whose agent is connected to this coordinator."})
	heartbeatsReceived = promauto.NewCounter(prometheus.CounterOpts{
		Name: "fleet_heartbeats_received_total", Help: "Heartbeats received from agents."})
	heartbeatsDropped = promauto.NewCounter(prometheus.CounterOpts{
		Name: "fleet_heartbeats_dropped_total", Help: "Heartbeats dropped for coming sooner than the minimum interval."})
	deadlineMisses = promauto.NewCounter(prometheus.CounterOpts{
		Name: "fleet_heartbeat_deadline_misses_total", Help: "Connections closed for missing the heartbeat deadline."})
	badFrames = promauto.NewCounter(prometheus.CounterOpts{
		Name: "fleet_bad_frames_total", Help: "Malformed, oversized, binary or unknown frames from agents."})
)
