#!/bin/sh
# Builds the Go test binaries in GOPATH mode against Debian's containerd 1.6 sources.
# Usage: build.sh <output dir>   → <output dir>/suite.test and <output dir>/bench.test
set -eu
out=$(mkdir -p "$1" && cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
gopath="$out/gopath"
rm -rf "$gopath/src/zlayer-gotestsuite"
mkdir -p "$gopath/src/zlayer-gotestsuite"
# Copy (not symlink): the go tool resolves GOPATH packages by real path.
cp -R "$here/harness" "$here/bench" "$here/suite_test.go" "$gopath/src/zlayer-gotestsuite/"
export GO111MODULE=off GOFLAGS= GOPATH="$gopath:${ZLAYER_GOCODE:-/usr/share/gocode}"
[ -n "${HOME:-}" ] || export GOCACHE="$out/gocache"
cd "$gopath/src/zlayer-gotestsuite"
go test -c -o "$out/suite.test" .
cd bench
go test -c -o "$out/bench.test" .
