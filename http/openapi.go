package http

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/labstack/echo/v4"
)

// operation describes one endpoint for /api/openapi.json.
type operation struct {
	method, path, summary string
	auth                  bool
	body                  string // schema name of the JSON body, if any
	query                 []string
	answer                string // schema name of "data" on success
	status                int
}

// operations lists every endpoint the server routes; a test keeps the two in
// step.
var operations = []operation{
	{method: "GET", path: "/healthz", summary: "Liveness probe.", status: 200},
	{method: "GET", path: "/readyz", summary: "Readiness probe: 503 while shutting down or when the store is unavailable.", status: 200},
	{method: "GET", path: "/api/openapi.json", summary: "This document.", status: 200},
	{method: "GET", path: "/metrics", summary: "Prometheus metrics (text exposition format, not the JSON envelope).", status: 200},
	{method: "GET", path: "/socket.io/", summary: "Engine.IO v4 / Socket.IO v5 (namespace /fleet) for agents written with socket.io-client: long-polling GET and POST, WebSocket upgrade. Same events and key as /fleet; a refused key gets connect then a server disconnect.", status: 200},
	{method: "POST", path: "/socket.io/", summary: "Engine.IO long-polling upload.", status: 200},
	{method: "GET", path: "/fleet", summary: "Native agent WebSocket. Authorization: Bearer hak_... on the handshake; 401 without upgrade for a missing, malformed, unknown or revoked key. JSON text frames {event, data, ack}.", status: 101},
	{method: "GET", path: "/api/marketplace/nodes", summary: "Public listing of nodes, filtered, sorted and paged with an opaque cursor.",
		query: []string{"status", "gpu_model", "min_gpus", "min_vram", "max_price", "region", "sort", "limit", "cursor"}, answer: "NodeList", status: 200},
	{method: "GET", path: "/api/marketplace/nodes/{id}", summary: "Public view of one node with live status.", answer: "Node", status: 200},
	{method: "GET", path: "/api/marketplace/stats", summary: "Marketplace totals.", answer: "Stats", status: 200},
	{method: "POST", path: "/api/marketplace/nodes", summary: "Register a node; the answer holds its host API key, shown this once.", auth: true, body: "NodeInput", answer: "NodeWithKey", status: 201},
	{method: "PUT", path: "/api/marketplace/nodes/{id}", summary: "Edit name, region, price or specs of one's own node.", auth: true, body: "NodeInput", answer: "Node", status: 200},
	{method: "DELETE", path: "/api/marketplace/nodes/{id}", summary: "Delete one's own node: revokes its key and disconnects its agent.", auth: true, status: 200},
	{method: "GET", path: "/api/marketplace/my-nodes", summary: "The caller's nodes with private fields.", auth: true, answer: "NodeList", status: 200},
	{method: "POST", path: "/api/marketplace/nodes/{id}/api-key", summary: "Rotate the host API key; the old key stops working at once.", auth: true, answer: "NodeWithKey", status: 200},
	{method: "DELETE", path: "/api/marketplace/nodes/{id}/api-key", summary: "Revoke the host API key without replacement.", auth: true, answer: "Node", status: 200},
	{method: "POST", path: "/api/billing/rentals", summary: "Rent an online node. Honours the Idempotency-Key header: a retry with the same key and body returns the same rental, a different body 409.", auth: true, body: "RentalInput", answer: "Rental", status: 201},
	{method: "GET", path: "/api/billing/rentals", summary: "The caller's rentals, newest first: as renter, or as owner with role=owner.", auth: true, query: []string{"status", "role", "limit", "cursor"}, answer: "RentalList", status: 200},
	{method: "GET", path: "/api/billing/rentals/{id}", summary: "One rental, for its renter or its node's owner.", auth: true, answer: "Rental", status: 200},
	{method: "POST", path: "/api/billing/rentals/{id}/stop", summary: "Stop a live rental (renter or owner).", auth: true, answer: "Rental", status: 200},
	{method: "GET", path: "/api/billing/earnings", summary: "Host earnings per node and in total.", auth: true, status: 200},
	{method: "GET", path: "/api/billing/summary", summary: "Renter summary: live rentals, accrued and total spend.", auth: true, status: 200},
}

var schemas = map[string]any{
	"Specs": obj(map[string]any{
		"gpu_model": str(), "gpu_count": integer(), "gpu_vram_gb": integer(),
		"cpu_cores": integer(), "ram_gb": integer(), "disk_gb": integer(),
	}),
	"NodeInput": obj(map[string]any{
		"name": str(), "region": str(), "price_per_hour_cents": integer(), "specs": ref("Specs"),
	}),
	"Metrics": map[string]any{"type": "object", "description": "Latest heartbeat: cpu_percent, memory/disk used and total bytes, load averages, gpus."},
	"Node": obj(map[string]any{
		"id": str(), "owner_id": str(), "name": str(), "region": str(), "price_per_hour_cents": integer(),
		"specs": ref("Specs"), "status": map[string]any{"type": "string", "enum": []string{"offline", "online", "rented"}},
		"last_seen_at": nullable("string"), "connected_since": nullable("string"), "metrics": ref("Metrics"),
		"reliability": map[string]any{"type": "number", "minimum": 0, "maximum": 1},
		"created_at":  str(), "updated_at": str(),
		"api_key_prefix": map[string]any{"type": "string", "description": "Owner's views only."},
	}),
	"NodeList":    map[string]any{"type": "array", "items": ref("Node")},
	"RentalInput": obj(map[string]any{"node_id": str(), "max_hours": map[string]any{"type": "number"}}),
	"Rental": obj(map[string]any{
		"id": str(), "node_id": str(), "renter_id": str(), "owner_id": str(), "price_per_hour_cents": integer(),
		"status":     map[string]any{"type": "string", "enum": []string{"active", "paused", "stopped", "completed", "interrupted"}},
		"started_at": str(), "ended_at": nullable("string"), "end_reason": nullable("string"),
		"max_hours": nullable("number"), "billable_seconds": integer(), "cost_cents": integer(),
	}),
	"RentalList":  map[string]any{"type": "array", "items": ref("Rental")},
	"NodeWithKey": obj(map[string]any{"node": ref("Node"), "api_key": str()}),
	"Stats":       map[string]any{"type": "object"},
	"Error": obj(map[string]any{
		"success": map[string]any{"const": false},
		"error": obj(map[string]any{
			"code": map[string]any{"type": "string", "enum": []string{"UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND",
				"VALIDATION_ERROR", "CONFLICT", "PAYLOAD_TOO_LARGE", "RATE_LIMITED", "INTERNAL_ERROR", "METHOD_NOT_ALLOWED"}},
			"message": str(),
			"details": map[string]any{"type": "object", "additionalProperties": str()},
		}),
	}),
}

func obj(props map[string]any) map[string]any {
	return map[string]any{"type": "object", "properties": props}
}
func str() map[string]any              { return map[string]any{"type": "string"} }
func integer() map[string]any          { return map[string]any{"type": "integer"} }
func nullable(t string) map[string]any { return map[string]any{"type": []string{t, "null"}} }
func ref(name string) map[string]any   { return map[string]any{"$ref": "#/components/schemas/" + name} }
func envelopeOf(data any) map[string]any {
	return obj(map[string]any{"success": map[string]any{"const": true}, "data": data, "meta": map[string]any{"type": "object"}})
}

func openAPIDocument() map[string]any {
	paths := map[string]any{}
	errAnswer := map[string]any{"description": "Error envelope", "content": map[string]any{
		"application/json": map[string]any{"schema": ref("Error")}}}
	for _, op := range operations {
		item, _ := paths[op.path].(map[string]any)
		if item == nil {
			item = map[string]any{}
			paths[op.path] = item
		}
		var data any = map[string]any{}
		if op.answer != "" {
			data = ref(op.answer)
		}
		o := map[string]any{
			"summary": op.summary,
			"responses": map[string]any{
				strconv.Itoa(op.status): map[string]any{"description": "Success", "content": map[string]any{
					"application/json": map[string]any{"schema": envelopeOf(data)}}},
				"default": errAnswer,
			},
		}
		var params []any
		if strings.Contains(op.path, "{id}") {
			params = append(params, map[string]any{"name": "id", "in": "path", "required": true, "schema": str()})
		}
		for _, q := range op.query {
			params = append(params, map[string]any{"name": q, "in": "query", "schema": str()})
		}
		if params != nil {
			o["parameters"] = params
		}
		if op.auth {
			o["security"] = []any{map[string]any{"clerk": []string{}}}
		}
		if op.body != "" {
			o["requestBody"] = map[string]any{"required": true, "content": map[string]any{
				"application/json": map[string]any{"schema": ref(op.body)}}}
		}
		item[strings.ToLower(op.method)] = o
	}
	return map[string]any{
		"openapi": "3.1.0",
		"info":    map[string]any{"title": "DistributedCompute fleet coordinator", "version": "1"},
		"paths":   paths,
		"components": map[string]any{
			"schemas": schemas,
			"securitySchemes": map[string]any{"clerk": map[string]any{
				"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "Clerk session token"}},
		},
	}
}

func (s *Server) openAPI(c echo.Context) error {
	return c.JSON(http.StatusOK, s.openapi)
}
