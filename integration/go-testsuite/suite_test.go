//go:build linux

// Package gotestsuite runs containerd's snapshots/testsuite over a unix socket through
// containerd's proxy client: once against `zlayer-storage snapshotter` (a fresh daemon per
// subtest) and once against containerd's own overlay snapshotter served in-process by
// contrib/snapshotservice, so both are measured through the same gRPC path.
//
// Build in GOPATH mode (see integration/snapshotter_conformance.rs):
//
//	GO111MODULE=off GOPATH=<tmp>:/usr/share/gocode go test -c -o <bin> .
//	ZLAYER_STORAGE_BIN=<zlayer-storage> <bin> -test.v -test.run TestZlayer
package gotestsuite

import (
	"context"
	"testing"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/testsuite"

	"zlayer-gotestsuite/harness"
)

// TestZlayer is the conformance run against our daemon.
func TestZlayer(t *testing.T) {
	bin := harness.BinaryFromEnv(t)
	testsuite.SnapshotterSuite(t, "zlayer", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return harness.StartDaemon(ctx, bin, root)
	})
}

// TestOverlayBaseline runs the same suite against containerd's overlay snapshotter behind the
// same proxy, as the reference our results are compared with.
func TestOverlayBaseline(t *testing.T) {
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return harness.StartOverlay(ctx, root)
	})
}
