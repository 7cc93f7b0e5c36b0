// Command coordinator runs the DistributedCompute fleet coordinator.
//
//	coordinator [serve]                      start the server (the default)
//	coordinator dev-token --user ID [--ttl]  print a dev-mode session token
//	coordinator version                      print the version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"syscall"
	"time"

	"github.com/joho/godotenv"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/actors"
	fleethttp "github.com/distributedcompute/fleet/http"
	"github.com/distributedcompute/fleet/persistence"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// A .env file in the working directory fills settings the environment
	// leaves unset; the environment wins.
	if err := godotenv.Load(); err != nil && !errors.Is(err, os.ErrNotExist) {
		fmt.Fprintln(os.Stderr, "coordinator: .env:", err)
		os.Exit(2)
	}
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "serve":
		err = serve(getenv, stderr)
	case "dev-token":
		err = devToken(args, getenv, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "coordinator", buildVersion())
	case "-h", "--help", "help":
		fmt.Fprintln(stdout, "usage: coordinator [serve | dev-token --user ID [--ttl DURATION] | version]")
	default:
		fmt.Fprintf(stderr, "coordinator: unknown command %q (serve, dev-token, version)\n", cmd)
		return 2
	}
	var se *settingError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &se), errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "coordinator:", err)
		return 2
	default:
		fmt.Fprintln(stderr, "coordinator:", err)
		return 1
	}
}

func buildVersion() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}

func devToken(args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("dev-token", flag.ContinueOnError)
	fs.SetOutput(stderr)
	user := fs.String("user", "", "user ID (the token's sub)")
	ttl := fs.Duration("ttl", time.Hour, "how long the token is valid")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if *user == "" || fs.NArg() > 0 {
		return fmt.Errorf("%w: coordinator dev-token --user ID [--ttl DURATION]", errUsage)
	}
	if *ttl <= 0 || *ttl > 30*24*time.Hour {
		return fmt.Errorf("%w: --ttl must be between 1s and 720h", errUsage)
	}
	cfg, err := loadConfig(getenv, false)
	if err != nil {
		return err
	}
	keys, err := fleethttp.LoadDevKeys(cfg.DataDir)
	if err != nil {
		return err
	}
	token, err := keys.Mint(*user, *ttl)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, token)
	return nil
}

func newLogger(cfg *config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func serve(getenv func(string) string, stderr io.Writer) error {
	cfg, err := loadConfig(getenv, true)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)

	var store interface {
		fleet.NodeStore
		fleet.SessionStore
		fleet.RentalStore
		Close() error
	}
	var clusterCfg *actors.ClusterConfig
	var membership *actors.Membership
	if cfg.Cluster == "etcd" {
		clusterCfg = &actors.ClusterConfig{Name: cfg.ClusterName, EtcdEndpoints: cfg.EtcdEndpoints,
			AdvertiseHost: cfg.ClusterAdvertiseHost, Port: cfg.ClusterPort}
		// Joining comes first: see actors.Membership.
		if membership, err = actors.Join(*clusterCfg, log); err != nil {
			return err
		}
		// Members share one store in etcd; there is no crash clean-up of
		// sessions here, as the others' sessions are open in it too: a
		// node's stale session closes when it connects again.
		oc, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		es, err := persistence.OpenEtcd(oc, persistence.EtcdConfig{Endpoints: cfg.EtcdEndpoints,
			Prefix: "/distributedcompute/" + cfg.ClusterName + "/data/", DialTimeout: 5 * time.Second})
		cancel()
		if err != nil {
			return fmt.Errorf("open cluster store: %w", err)
		}
		store = es
	} else {
		bs, err := persistence.Open(filepath.Join(cfg.DataDir, "coordinator.db"))
		if err != nil {
			return fmt.Errorf("open store: %w", err)
		}
		store = bs
		// Sessions left open by a crash end at their last checkpoint.
		if err := bs.CloseOpenSessions(context.Background(), "coordinator restarted"); err != nil {
			return fmt.Errorf("close sessions left open: %w", err)
		}
	}
	defer store.Close()

	system, err := actors.New(actors.Config{
		Nodes:                store,
		Sessions:             store,
		Rentals:              store,
		LostAfter:            cfg.LostAfter,
		HeartbeatDeadline:    cfg.HeartbeatDeadline,
		HeartbeatMinInterval: cfg.HeartbeatMinInterval,
		Logger:               log,
		Cluster:              clusterCfg,
		Membership:           membership,
	})
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	verifier := &fleethttp.Verifier{Issuer: cfg.ClerkIssuer, AuthorizedParties: cfg.ClerkParties, Leeway: 5 * time.Second}
	if cfg.AuthMode == "dev" {
		keys, err := fleethttp.LoadDevKeys(cfg.DataDir)
		if err != nil {
			return err
		}
		verifier.Keys, verifier.Issuer = keys, fleethttp.DevIssuer
		log.Warn("AUTH_MODE=dev: accepting tokens from `coordinator dev-token`, not from Clerk; never use this in production")
	} else {
		keys := fleethttp.NewClerkKeys(cfg.ClerkAPIURL, cfg.ClerkSecretKey, log)
		go keys.Run(ctx, 10*time.Minute)
		verifier.Keys = keys
	}

	srv := fleethttp.NewServer(fleethttp.Config{
		Nodes:         store,
		Sessions:      store,
		Fleet:         system,
		Billing:       system,
		Rentals:       store,
		MaxFrameBytes: cfg.MaxFrameBytes,
		// Engine.IO's ping must not outlast the heartbeat deadline.
		SocketIOPingInterval: min(4*time.Second, cfg.HeartbeatDeadline),
		Verifier:             verifier,
		Logger:               log,
		MaxBodyBytes:         cfg.MaxBodyBytes,
		MaxPageSize:          cfg.MaxPageSize,
		RateLimitRPS:         cfg.RateLimitRPS,
		RateLimitBurst:       cfg.RateLimitBurst,
		CORSAllowedOrigins:   cfg.CORSOrigins,
	})

	l, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(cfg.Port)))
	if err != nil {
		return fmt.Errorf("listen on PORT %d: %w", cfg.Port, err)
	}
	log.Info("coordinator listening", "addr", l.Addr().String(), "version", buildVersion(),
		"auth_mode", cfg.AuthMode, "data_dir", cfg.DataDir, "tls", cfg.TLSCertFile != "", "cluster", cfg.Cluster != "")

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l, cfg.TLSCertFile, cfg.TLSKeyFile) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	// Refuse new agents first, then tell connected ones to go elsewhere
	// (1001) and record their sessions, then drain the REST requests.
	srv.StopAccepting()
	if err := system.Shutdown(sctx); err != nil {
		log.Warn("agents did not all disconnect in time", "error", err)
	}
	// REST requests in flight get their own grace, whatever the agents took.
	rctx, rcancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer rcancel()
	if err := srv.Shutdown(rctx); err != nil {
		log.Warn("shutdown did not finish in time", "error", err)
	}
	log.Info("stopped")
	return nil
}
