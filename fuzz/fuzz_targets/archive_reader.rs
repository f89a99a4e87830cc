//! Fuzzes the restore path's archive reader: zstd decoding, PAX/tar parsing and extraction into
//! a fresh target, through `archive::unpack_reader` (what `LayerSyncManager::restore_layer`
//! calls on the downloading spool).
//!
//! The archive module is compiled from the library's own source (`src/archive/`, which depends
//! on no other module of the crate), so this build instruments only the archive code and its
//! few dependencies instead of the whole daemon (S3 SDK, gRPC, SQLite).
//!
//! Input: a zstd frame is fed as is; anything else is taken as a tar stream and compressed
//! first, so mutations reach the tar parser instead of dying in the zstd decoder. The expected
//! digest is the input's own sha256, so a well-formed archive is swapped into the target.
//!
//! After every input: a failure left the target absent, a success left it a directory, and
//! nothing else exists under the temp root (no escape into the canary dirs around the target,
//! no leftover staging dir). Anything else panics, which libFuzzer reports as a crash.

#![no_main]

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

#[allow(dead_code, unused_imports)]
#[path = "../../src/archive/mod.rs"]
mod archive;
// The archive module's one crate-internal dependency (a leaf, std only).
#[path = "../../src/util/mod.rs"]
#[allow(dead_code)]
mod util;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Levels of canary dirs between the temp root and the target (`../../..` stays inside).
const DEPTH: usize = 3;

fuzz_target!(|data: &[u8]| {
    let compressed = if data.starts_with(&ZSTD_MAGIC) {
        data.to_vec()
    } else {
        zstd::bulk::compress(data, 1).expect("compress the input")
    };
    let digest = hex::encode(Sha256::digest(&compressed));
    let root = tempfile::Builder::new()
        .prefix("zlayer-fuzz-")
        .tempdir()
        .expect("temp root");
    let mut parent = root.path().to_path_buf();
    let mut allowed = Vec::new();
    for level in 0..DEPTH {
        parent.push(format!("d{level}"));
        fs::create_dir(&parent).expect("canary dir");
        allowed.push(parent.clone());
    }
    let target = parent.join("target");
    let opts = archive::UnpackOptions {
        max_uncompressed: 8 << 20,
        ..archive::UnpackOptions::default()
    };
    let result = archive::unpack_reader(
        Cursor::new(&compressed),
        Path::new("fuzz-input.tar.zst"),
        compressed.len() as u64,
        &digest,
        &target,
        &opts,
        None,
    );
    match &result {
        Ok(_) => assert!(
            fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()),
            "a successful restore left no target dir"
        ),
        Err(e) => assert!(
            fs::symlink_metadata(&target).is_err(),
            "a failed restore ({e:?}) left the target behind"
        ),
    }
    let mut stray = Vec::new();
    walk_outside(root.path(), &target, &allowed, &mut stray);
    assert!(
        stray.is_empty(),
        "written outside the target ({result:?}): {stray:?}"
    );
});

/// Collects every path under `dir` that is neither a canary dir nor inside `target`.
fn walk_outside(dir: &Path, target: &Path, allowed: &[PathBuf], stray: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read temp dir") {
        let path = entry.expect("read temp dir entry").path();
        if path == target {
            continue;
        }
        if allowed.contains(&path) {
            walk_outside(&path, target, allowed, stray);
        } else {
            stray.push(path);
        }
    }
}
