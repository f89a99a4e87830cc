//! Small helpers shared by several folders. A leaf module: std only.

pub(crate) mod mountinfo;
pub mod private;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// Longest part of `base` kept in a [`unique_temp_name`], so the name stays far below
/// `NAME_MAX` (255 bytes).
const MAX_BASE: usize = 120;

/// The error and its causes, joined by `": "` on one line.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// A name no other call returns, in this process or another one on the host, even across a pid
/// reuse: `{base}.{purpose}.{pid}.{nanos}.{n}`, with `base` cut to its first 120 bytes, the
/// wall clock in nanoseconds and a per-process counter. For temp files, staging dirs and
/// temporary object keys (`base` and `purpose` plain ASCII there, so the name is UTF-8).
#[must_use]
pub fn unique_temp_name(base: &[u8], purpose: &str) -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut name = base[..base.len().min(MAX_BASE)].to_vec();
    name.extend_from_slice(format!(".{purpose}.{}.{nanos}.{n}", std::process::id()).as_bytes());
    OsString::from_vec(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn error_chain_joins_every_cause() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(error_chain(&e), "outer: middle: inner");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }

    #[test]
    fn temp_names_are_unique_and_keep_base_and_purpose() {
        let a = unique_temp_name(b".spool", "tmp");
        let b = unique_temp_name(b".spool", "tmp");
        assert_ne!(a, b);
        let a = a.into_string().unwrap();
        let pid = std::process::id();
        assert!(a.starts_with(&format!(".spool.tmp.{pid}.")), "{a}");
        let long = unique_temp_name(&[b'x'; 300], "staging");
        assert!(long.len() < 200, "{long:?}");
        assert!(long.to_string_lossy().starts_with(&"x".repeat(MAX_BASE)));
    }
}
