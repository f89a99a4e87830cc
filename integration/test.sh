#!/usr/bin/env bash
# The test command (README "Quick start"; `.ci/run` calls it too). On a fresh Debian 12 machine,
# as root:
#   1. installs what the tests need when missing: apt packages (containerd, runc, umoci,
#      busybox-static, Go with containerd's sources for the conformance suite, zstd, ...), a
#      cargo-fuzz (for the fuzz run), cargo-deb (for the .deb; about 1.5 minutes to build) and
#      Garage 2.5.0 (`cargo install`, the S3 server of the S3 tests; about 11 minutes to build);
#   2. runs every test: `cargo test --locked -- --test-threads=2`. A test whose component is
#      missing fails, naming it, unless ZLAYER_TESTS_ALLOW_MISSING=1 (then it skips, saying so);
#   3. fuzzes the archive reader, then the SQLite WAL reader and segment decoder, each for
#      ZLAYER_FUZZ_SECONDS (default 120) after one build of both (see fuzz/run.sh);
#   4. builds the release binary and the .deb from it, and checks the package's contents
#      (packaging/deb.sh);
#   5. prints how many real-component tests ran (each one records itself in
#      $ZLAYER_TEST_REPORT) and the cargo test summary again.
# With --install-only, only step 1. Exit status: non-zero if any step failed or no
# real-component test ran.
set -uo pipefail
install_only=false
case "${1:-}" in
    "") ;;
    --install-only) install_only=true ;;
    *) echo "usage: $0 [--install-only]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
repo=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
start=$(date +%s)
step() { echo "==> [$(($(date +%s) - start))s] $*"; }
die() { echo "integration/test.sh: $*" >&2; exit 1; }
failed=()

step "apt packages"
pkgs=(build-essential pkg-config protobuf-compiler containerd runc golang-go
      golang-github-containerd-containerd-dev busybox-static umoci sqlite3 zstd awscli
      e2fsprogs attr time util-linux iproute2)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]}: run as root to install them"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

step "rust toolchains"
command -v cargo >/dev/null || die "cargo not found: install rustup (https://rustup.rs) into ~/.cargo"
cargo --version
# The fuzz run uses this one stable toolchain with RUSTC_BOOTSTRAP=1 (its rust-std ships the
# sanitizer runtimes); no other toolchain is downloaded.

step "cargo-fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked || die "cargo install cargo-fuzz failed"
fi
cargo fuzz --version

step "cargo-deb"
if ! cargo deb --version >/dev/null 2>&1; then
    cargo install cargo-deb --locked || die "cargo install cargo-deb failed"
fi
cargo deb --version

step "garage (S3 server for tests)"
if [[ -z ${GARAGE_BIN:-} ]]; then
    if command -v garage >/dev/null; then
        GARAGE_BIN=$(command -v garage)
    else
        cargo install garage --version 2.5.0 --locked || die "cargo install garage failed"
        GARAGE_BIN="$HOME/.cargo/bin/garage"
    fi
fi
export GARAGE_BIN
"$GARAGE_BIN" --version || die "$GARAGE_BIN does not run"
$install_only && { step "installed"; exit 0; }

step "tests"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
mkdir -p "$target_dir"
export ZLAYER_TEST_REPORT=$target_dir/real-component-tests.txt
rm -f "$ZLAYER_TEST_REPORT"
test_log=$target_dir/test-output.log
cargo test --locked -- --test-threads=2 2>&1 | tee "$test_log"
test_rc=${PIPESTATUS[0]}
((test_rc == 0)) || failed+=("cargo test (exit $test_rc)")

step "fuzz archive_reader, replicator (${ZLAYER_FUZZ_SECONDS:-120} s each)"
if ! bash fuzz/run.sh; then
    failed+=("fuzz (see fuzz/artifacts/<target>.log)")
fi

step ".deb (release build, cargo deb, contents check)"
if ! cargo build --release --locked; then
    failed+=("cargo build --release")
elif ! bash packaging/deb.sh --fast; then
    failed+=(".deb build or contents check (packaging/deb.sh)")
fi

step "summary"
# cargo test's own summary lines, so they stay at the end of the output.
grep -E '^(     Running|   Doc-tests|test result:)' "$test_log" || true
count() { grep -c "^$1 " "$ZLAYER_TEST_REPORT" 2>/dev/null || true; }
if [[ -s $ZLAYER_TEST_REPORT ]]; then
    sort -u -o "$ZLAYER_TEST_REPORT" "$ZLAYER_TEST_REPORT"
    total=$(cut -d' ' -f2 "$ZLAYER_TEST_REPORT" | sort -u | wc -l)
else
    total=0
fi
echo "real-component tests run: $total (garage: $(count garage), containerd: $(count containerd)," \
    "conformance: $(count conformance), root: $(count root))"
((total > 0)) || failed+=("no real-component test ran")
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
step "done"
