#!/usr/bin/env bash
# Builds the .deb from an already built release binary (`cargo build --release --locked`; it is
# not rebuilt here) with `cargo deb --no-build`, then checks what the package holds: the binary,
# the systemd units, the hooks.d file, the example config as a conffile, the docs and the
# maintainer scripts. Any missing piece fails with a message naming it.
#   bash packaging/deb.sh [CARGO-DEB-ARGS...]  -> target/debian/zlayer-storage_<version>-1_<arch>.deb
# (e.g. `--fast`, lighter compression, which the test run uses: it only checks the package).
# Needs cargo-deb (`cargo install cargo-deb --locked`) and dpkg-deb. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
bin=$target_dir/release/zlayer-storage
die() { echo "packaging/deb.sh: $*" >&2; exit 1; }

[[ -x $bin ]] || die "no release binary at $bin: run \`cargo build --release --locked\` first"
cargo deb --version >/dev/null 2>&1 || die "cargo-deb missing: cargo install cargo-deb --locked"
command -v dpkg-deb >/dev/null || die "dpkg-deb missing (apt-get install dpkg)"

out_dir=$target_dir/debian
mkdir -p "$out_dir"
# cargo-deb prints the path of the package it wrote as its last line.
deb=$(cargo deb --no-build --locked --output "$out_dir" "$@" | tail -n 1)
[[ -f $deb ]] || die "cargo deb did not report a package (got: $deb)"
echo "built $deb"

contents=$(dpkg-deb -c "$deb") || die "dpkg-deb -c $deb failed"
info=$(dpkg-deb -I "$deb") || die "dpkg-deb -I $deb failed"
conffiles=$(dpkg-deb -I "$deb" conffiles 2>/dev/null) || die "$deb has no conffiles"
postinst=$(dpkg-deb -I "$deb" postinst 2>/dev/null) || die "$deb has no postinst"

missing=()
need_file() { # PATH MODE: the package holds PATH with permissions MODE
    local line
    line=$(awk -v p="./$1" '$6 == p {print $1}' <<<"$contents")
    if [[ -z $line ]]; then
        missing+=("file /$1")
    elif [[ $line != "$2" ]]; then
        missing+=("/$1 with mode $2 (has $line)")
    fi
}
need_file usr/bin/zlayer-storage -rwxr-xr-x
need_file usr/lib/systemd/system/zlayer-snapshotter.service -rw-r--r--
need_file usr/lib/systemd/system/zlayer-snapshotter.socket -rw-r--r--
need_file usr/lib/systemd/system/zlayer-control.socket -rw-r--r--
need_file usr/share/containers/oci/hooks.d/zlayer-storage.json -rw-r--r--
need_file etc/zlayer/storage.toml -rw-r--r--
need_file usr/share/doc/zlayer-storage/README.md -rw-r--r--
need_file usr/share/doc/zlayer-storage/copyright -rw-r--r--
need_file usr/share/doc/zlayer-storage/examples/systemd/credentials.conf.example -rw-r--r--
need_file usr/share/doc/zlayer-storage/examples/containerd/config-v2.toml -rw-r--r--
need_file usr/share/doc/zlayer-storage/examples/containerd/config-v3.toml -rw-r--r--
need_file usr/share/doc/zlayer-storage/examples/cri/base_runtime_spec.json -rw-r--r--
need_file usr/share/doc/zlayer-storage/examples/grafana/zlayer-storage.json -rw-r--r--
grep -qx /etc/zlayer/storage.toml <<<"$conffiles" || missing+=("conffile /etc/zlayer/storage.toml")
grep -q '^ Package: zlayer-storage$' <<<"$info" || missing+=("control field Package: zlayer-storage")
grep -q '^ Depends: .*libc6' <<<"$info" || missing+=("control field Depends on libc6")
# The upgrade restarts the daemon only; the sockets must never be restarted (containerd would
# see them vanish).
grep -q 'try-restart zlayer-snapshotter.service' <<<"$postinst" ||
    missing+=("postinst restart of zlayer-snapshotter.service")
if grep -Eq '(restart|stop|start) .*\.socket' <<<"$postinst"; then
    missing+=("postinst without (re)starting a socket unit")
fi

# The packaged files themselves: the maintainer scripts parse, the binary runs, the units pass
# systemd's checks.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp"
dpkg-deb -e "$deb" "$tmp/DEBIAN"
for script in "$tmp"/DEBIAN/{preinst,postinst,prerm,postrm}; do
    [[ -e $script ]] || continue
    sh -n "$script" || missing+=("a maintainer script $(basename "$script") that parses")
    ! grep -q '#DEBHELPER#' "$script" || missing+=("$(basename "$script") with #DEBHELPER# filled in")
done
"$tmp/usr/bin/zlayer-storage" version >/dev/null || missing+=("a packaged binary that runs")
# The packaged binary is the one just built, stripped (its debug info is under /usr/lib/debug).
build_id() { readelf -n "$1" 2>/dev/null | awk '/Build ID/ {print $3}'; }
id=$(build_id "$bin")
[[ -n $id && $(build_id "$tmp/usr/bin/zlayer-storage") == "$id" ]] ||
    missing+=("the binary just built at $bin (build id ${id:-unknown})")
[[ -f $tmp/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug ]] ||
    missing+=("its debug info /usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug")
if command -v systemd-analyze >/dev/null; then
    # Verified as installed, except that ExecStart= names the extracted binary (the host may
    # have no /usr/bin/zlayer-storage); the unit search path keeps the host's own units.
    units=$tmp/units
    mkdir -p "$units"
    for u in zlayer-snapshotter.service zlayer-snapshotter.socket zlayer-control.socket; do
        sed "s#/usr/bin/zlayer-storage#$tmp/usr/bin/zlayer-storage#" \
            "$tmp/usr/lib/systemd/system/$u" >"$units/$u"
    done
    if ! verify=$(SYSTEMD_UNIT_PATH="$units:" systemd-analyze verify \
        "$units/zlayer-snapshotter.service" "$units/zlayer-snapshotter.socket" \
        "$units/zlayer-control.socket" 2>&1); then
        missing+=("units that pass systemd-analyze verify: $verify")
    fi
else
    echo "systemd-analyze not found: units not verified"
fi
if command -v python3 >/dev/null &&
    ! python3 -m json.tool "$tmp/usr/share/containers/oci/hooks.d/zlayer-storage.json" >/dev/null; then
    missing+=("valid JSON in hooks.d/zlayer-storage.json")
fi

if ((${#missing[@]})); then
    printf 'packaging/deb.sh: %s lacks: %s\n' "$deb" "${missing[0]}" >&2
    for m in "${missing[@]:1}"; do printf '  and: %s\n' "$m" >&2; done
    exit 1
fi
echo "checked $deb: binary, units, hooks.d, config (conffile), docs, maintainer scripts"
