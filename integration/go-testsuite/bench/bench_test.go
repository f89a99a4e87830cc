//go:build linux

// Package bench times containerd's snapshotter benchmark workload (the one in
// snapshots/benchsuite: 16 layers of 1 MB files created, patched and deleted, timing Prepare,
// mount+write+unmount and Commit) through the gRPC proxy client, against zlayer-storage and
// against containerd's overlay snapshotter served the same way. benchsuite's own functions are
// unexported test code, so the workload is restated here.
package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"

	"zlayer-gotestsuite/harness"
)

const (
	layers   = 16
	fileSize = 1 << 20
)

// op changes one file of a layer.
type op struct {
	kind byte // 'c' create with random content, 'u' patch 4 bytes mid-file, 'r' remove
	name string
}

// plan returns the operations of layer i (1-based): every third layer mixes patches,
// creates and a delete; other even layers likewise with different files; the rest create all.
func plan(i int) []op {
	names := []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"}
	var kinds string
	switch {
	case i%3 == 0:
		kinds = "uucuucrcuc"
	case i%2 == 0:
		kinds = "ucrcurcucu"
	default:
		kinds = "cccccccccc"
	}
	ops := make([]op, len(names))
	for n := range names {
		ops[n] = op{kind: kinds[n], name: names[n]}
	}
	return ops
}

func apply(root string, ops []op) error {
	for _, o := range ops {
		p := filepath.Join(root, o.name)
		switch o.kind {
		case 'c':
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o777)
			if err != nil {
				return err
			}
			_, err = io.CopyN(f, rand.Reader, fileSize)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("create %s: %w", p, err)
			}
		case 'u':
			f, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				return fmt.Errorf("patch %s: %w", p, err)
			}
			st, err := f.Stat()
			if err == nil {
				buf := make([]byte, 4)
				if _, err = rand.Read(buf); err == nil {
					_, err = f.WriteAt(buf, st.Size()/2)
				}
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("patch %s: %w", p, err)
			}
		case 'r':
			if err := os.RemoveAll(p); err != nil {
				return err
			}
		}
	}
	return nil
}

func run(b *testing.B, sn snapshots.Snapshotter) {
	ctx := context.Background()
	var prepare, write, commit time.Duration
	parent := ""
	seq := 0
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		for l := 1; l <= layers; l++ {
			seq++
			key := fmt.Sprintf("active-%d", seq)
			t := time.Now()
			mounts, err := sn.Prepare(ctx, key, parent)
			if err != nil {
				b.Fatal(err)
			}
			prepare += time.Since(t)

			t = time.Now()
			ops := plan(l)
			if err := mount.WithTempMount(ctx, mounts, func(root string) error { return apply(root, ops) }); err != nil {
				b.Fatal(err)
			}
			write += time.Since(t)

			name := fmt.Sprintf("committed-%d", seq)
			t = time.Now()
			if err := sn.Commit(ctx, name, key); err != nil {
				b.Fatal(err)
			}
			commit += time.Since(t)
			parent = name
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(prepare.Nanoseconds())/float64(b.N), "prepare-ns/op")
	b.ReportMetric(float64(write.Nanoseconds())/float64(b.N), "write-ns/op")
	b.ReportMetric(float64(commit.Nanoseconds())/float64(b.N), "commit-ns/op")
}

func tempRoot(b *testing.B) string {
	dir, err := os.MkdirTemp(os.Getenv("ZLAYER_BENCH_DIR"), "zlayer-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// BenchmarkZlayer runs the workload against a fresh zlayer-storage daemon.
func BenchmarkZlayer(b *testing.B) {
	bin := harness.BinaryFromEnv(b)
	sn, cleanup, err := harness.StartDaemon(context.Background(), bin, tempRoot(b))
	if err != nil {
		b.Fatal(err)
	}
	defer cleanup()
	run(b, sn)
}

// BenchmarkOverlay runs the workload against containerd's overlay snapshotter behind the proxy.
func BenchmarkOverlay(b *testing.B) {
	sn, cleanup, err := harness.StartOverlay(context.Background(), tempRoot(b))
	if err != nil {
		b.Fatal(err)
	}
	defer cleanup()
	run(b, sn)
}
