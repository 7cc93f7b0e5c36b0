# DistributedCompute fleet coordinator.
SHELL := /bin/bash
GO          ?= go
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
NODE_FIXTURE := test/socketio

PROTOC_GEN_GO ?= google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12

.PHONY: run build test lint bench fixtures proto

## run: start the coordinator in dev mode with its bbolt store under ./data
run:
	AUTH_MODE=$${AUTH_MODE:-dev} $(GO) run ./cmd/coordinator serve

## build: build the coordinator and agent binaries into ./bin
build:
	$(GO) build -o bin/coordinator ./cmd/coordinator
	$(GO) build -o bin/agent ./cmd/agent
	$(GO) build -o bin/fleetload ./cmd/fleetload

## fixtures: install the Node.js test fixtures (socket.io-client) if missing
fixtures:
	@if [ -f $(NODE_FIXTURE)/package-lock.json ] && [ ! -d $(NODE_FIXTURE)/node_modules ]; then \
		cd $(NODE_FIXTURE) && npm ci --no-audit --no-fund; fi

## test: every test, with the race detector
test: fixtures
	$(GO) test -race -count=1 -v ./... 2>&1 | tee test.out | grep -E '^(=== RUN|--- (PASS|FAIL|SKIP)|PASS|FAIL|ok|panic|\s+\S+_test\.go:)' | grep -v '^=== RUN'; \
		status=$${PIPESTATUS[0]}; \
		echo "tests: $$(grep -cE -- '^ *--- PASS' test.out) passed, $$(grep -cE -- '^ *--- FAIL' test.out) failed, $$(grep -cE -- '^ *--- SKIP' test.out) skipped (tests and subtests)"; \
		exit $$status

## lint: gofmt, go vet, staticcheck
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

## bench: Go benchmarks, then fleetload: 2000 agents for 20 s against a coordinator it starts, and 3000 agents for 20 s on a cluster of 3 coordinators on an etcd it starts (see BENCHMARKS.md)
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...
	$(GO) build -o bin/coordinator ./cmd/coordinator
	$(GO) build -o bin/fleetload ./cmd/fleetload
	bin/fleetload -spawn -coordinator-bin bin/coordinator -agents 2000 -duration 20s
	@if command -v etcd >/dev/null; then bin/fleetload -spawn-cluster 3 -coordinator-bin bin/coordinator -agents 3000 -duration 20s; else echo "etcd not found (apt-get install etcd-server): cluster run skipped"; fi

## proto: regenerate proto/*.pb.go with Debian's protoc (apt-get install protobuf-compiler) and the pinned plugin
proto:
	@command -v protoc >/dev/null || { echo "protoc not found: apt-get install -y protobuf-compiler"; exit 1; }
	GOBIN=$(CURDIR)/bin $(GO) install $(PROTOC_GEN_GO)
	PATH=$(CURDIR)/bin:$$PATH protoc --go_out=. --go_opt=paths=source_relative proto/fleet.proto
