//! A tiny busybox OCI image built offline, for importing into a private containerd.
//!
//! The rootfs holds Debian's static busybox plus the files the end-to-end tests modify (a file to
//! delete, a directory to make opaque), so a restored layer can be checked against known lower
//! content. `umoci` packs it into an OCI layout; the layout is tarred for `ctr images import`.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Repository part of the image name; `ctr images import --base-name` joins it with the tag.
pub const IMAGE_BASE: &str = "docker.io/zlayer/busybox";
/// Tag recorded in the OCI index (`org.opencontainers.image.ref.name`).
pub const IMAGE_TAG: &str = "test";
/// Full reference of the imported image.
pub const IMAGE_REF: &str = "docker.io/zlayer/busybox:test";

/// Applets linked to `/bin/busybox`.
const APPLETS: &[&str] = &[
    "sh",
    "ls",
    "cat",
    "echo",
    "mkdir",
    "rm",
    "rmdir",
    "sleep",
    "touch",
    "stat",
    "find",
    "sha256sum",
    "head",
    "tail",
    "dd",
    "wc",
    "true",
    "false",
    "test",
    "[",
    "sync",
    "cp",
    "mv",
    "ln",
    "du",
    "grep",
    "tr",
    "seq",
    "chmod",
    "sort",
    "xargs",
    "printf",
    "env",
    "id",
    "readlink",
];

/// Files of the image: path, content. Tests rely on these exact contents.
pub const IMAGE_FILES: &[(&str, &str)] = &[
    (
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    ),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/motd", "welcome to the zlayer test image\n"),
    ("data/keep", "keep me\n"),
    ("data/old/a", "lower a\n"),
    ("data/old/b", "lower b\n"),
];

/// Bump when the recipe changes, so a cached archive from an older recipe is not reused.
const RECIPE_VERSION: u32 = 2;

/// Path of the image archive (an OCI layout in a tar), built once per test process.
///
/// The archive lives in Cargo's per-target temp dir under a versioned name and is written to a
/// temp name and renamed into place, so concurrent test processes never see a partial file.
pub fn busybox_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(&dir).expect("create CARGO_TARGET_TMPDIR");
        let out = dir.join(format!("zlayer-busybox-v{RECIPE_VERSION}.oci.tar"));
        if !out.exists() {
            build_archive(&dir, &out);
        }
        out
    })
}

fn build_archive(tmp_parent: &Path, out: &Path) {
    let work = tempfile::Builder::new()
        .prefix("busybox-image-")
        .tempdir_in(tmp_parent)
        .expect("create image work dir");
    let rootfs = work.path().join("rootfs");
    build_rootfs(&rootfs);

    let layout = work.path().join("oci");
    let image = format!("{}:{IMAGE_TAG}", layout.display());
    run("umoci", &["init", "--layout", &layout.to_string_lossy()]);
    run("umoci", &["new", "--image", &image]);
    // `insert SRC /` adds the whole rootfs as one layer; ownership and modes are kept as is.
    run(
        "umoci",
        &["insert", "--image", &image, &rootfs.to_string_lossy(), "/"],
    );
    run(
        "umoci",
        &[
            "config",
            "--image",
            &image,
            "--config.cmd",
            "/bin/sh",
            "--config.env",
            "PATH=/bin",
            "--config.workingdir",
            "/",
        ],
    );
    // Drop the superseded manifests/configs left by each step.
    run("umoci", &["gc", "--layout", &layout.to_string_lossy()]);

    let partial = work.path().join("image.tar");
    run(
        "tar",
        &[
            "-C",
            &layout.to_string_lossy(),
            "-cf",
            &partial.to_string_lossy(),
            ".",
        ],
    );
    fs::rename(&partial, out).expect("move image archive into place");
}

fn build_rootfs(rootfs: &Path) {
    for dir in [
        "bin", "etc", "data/old", "dev", "proc", "sys", "run", "root",
    ] {
        fs::create_dir_all(rootfs.join(dir)).expect("create rootfs dir");
    }
    let tmp = rootfs.join("tmp");
    fs::create_dir_all(&tmp).expect("create /tmp");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).expect("chmod /tmp");

    let busybox = rootfs.join("bin/busybox");
    fs::copy("/bin/busybox", &busybox).expect("copy /bin/busybox (package busybox-static)");
    fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755)).expect("chmod busybox");
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet)).expect("link applet");
    }
    for (path, content) in IMAGE_FILES {
        let p = rootfs.join(path);
        fs::write(&p, content).expect("write image file");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod image file");
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn archive_is_an_oci_layout_with_the_expected_tag() {
    let archive = busybox_archive();
    let out = Command::new("tar")
        .args(["-xOf", &archive.to_string_lossy(), "./index.json"])
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: serde_json::Value = serde_json::from_slice(&out.stdout).expect("index.json is JSON");
    let manifests = index["manifests"].as_array().expect("manifests array");
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        IMAGE_TAG
    );
}
