//go:build linux

// Package harness starts snapshotters behind a unix socket and returns containerd's proxy
// client for them, for the conformance suite and the benchmarks.
package harness

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
)

// BinaryFromEnv returns the zlayer-storage binary named by ZLAYER_STORAGE_BIN.
func BinaryFromEnv(tb testing.TB) string {
	bin := os.Getenv("ZLAYER_STORAGE_BIN")
	if bin == "" {
		tb.Fatal("ZLAYER_STORAGE_BIN must name the zlayer-storage binary")
	}
	return bin
}

// StartDaemon runs `zlayer-storage snapshotter` with its root and socket inside dir and
// returns a proxy client; the cleanup closes the connection and stops the daemon.
func StartDaemon(ctx context.Context, bin, dir string) (snapshots.Snapshotter, func() error, error) {
	socket := filepath.Join(dir, "zlayer.sock")
	config := filepath.Join(dir, "zlayer.toml")
	// A private config keeps the run independent of /etc/zlayer/storage.toml, and the layer
	// store, staging dir, state DB (opened for persistence) and control socket inside dir; no
	// containerd runs here, so no events are watched.
	storage := fmt.Sprintf("[storage]\nlocal_store_dir = %q\nstaging_dir = %q\nstate_db_path = %q\n"+
		"[snapshotter]\nwatch_events = false\ncontrol_socket = %q\n",
		filepath.Join(dir, "store"), filepath.Join(dir, "staging"), filepath.Join(dir, "state.sqlite"),
		filepath.Join(dir, "control.sock"))
	if err := os.WriteFile(config, []byte(storage), 0o600); err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "--config", config, "snapshotter",
		"--root", filepath.Join(dir, "zlayer-root"), "--socket", socket)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Kill()
		<-exited
		return nil
	}
	conn, err := dial(ctx, socket, exited)
	if err != nil {
		_ = stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "zlayer")
	return sn, func() error {
		cerr := conn.Close()
		_ = stop()
		return cerr
	}, nil
}

// StartOverlay serves containerd's overlay snapshotter (root inside dir) over a unix socket in
// this process, so it is measured through the same proxy path as the daemon.
func StartOverlay(ctx context.Context, dir string) (snapshots.Snapshotter, func() error, error) {
	backend, err := overlay.NewSnapshotter(filepath.Join(dir, "overlay-root"), overlay.AsynchronousRemove)
	if err != nil {
		return nil, nil, err
	}
	socket := filepath.Join(dir, "overlay.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		backend.Close()
		return nil, nil, err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(backend))
	go func() { _ = srv.Serve(l) }()
	conn, err := dial(ctx, socket, nil)
	if err != nil {
		srv.Stop()
		backend.Close()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "overlayfs")
	return sn, func() error {
		cerr := conn.Close()
		srv.Stop()
		if err := backend.Close(); err != nil && cerr == nil {
			cerr = err
		}
		return cerr
	}, nil
}

// dial waits for the socket to accept connections, giving up early if the daemon exits.
func dial(ctx context.Context, socket string, exited <-chan error) (*grpc.ClientConn, error) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(socket); err == nil {
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			conn, err := grpc.DialContext(dctx, "unix://"+socket,
				grpc.WithInsecure(),
				grpc.WithBlock(),
				grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "unix", socket)
				}))
			cancel()
			if err == nil {
				return conn, nil
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("dial %s: %w", socket, err)
			}
		}
		select {
		case err := <-exited:
			return nil, fmt.Errorf("snapshotter exited before serving %s: %v", socket, err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("socket %s did not appear", socket)
		}
	}
}
