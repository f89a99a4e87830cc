//! Parsing of the backend keys containerd's metadata layer sends: `<namespace>/<seq>/<client key>`.
//!
//! The key is the only reliable identity (gRPC metadata carries no namespace on GC calls), and
//! `<seq>` changes whenever a container is recreated, so the stable part is namespace + name.

/// A backend key split into its parts. Borrowed from the original string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey<'a> {
    /// containerd namespace, e.g. `default` or `k8s.io`.
    pub namespace: &'a str,
    /// Per-(namespace, snapshotter) counter containerd assigns on every create and commit.
    pub seq: u64,
    /// The client's key: a container id, `extract-<nanos>-<rand> <chainID>`, `sha256:<chainID>`, ...
    pub name: &'a str,
}

impl<'a> BackendKey<'a> {
    /// Splits `key`; `None` when it was not produced by containerd's metadata layer (for example
    /// a direct client such as the conformance suite, whose keys are plain paths).
    #[must_use]
    pub fn parse(key: &'a str) -> Option<Self> {
        let (namespace, rest) = key.split_once('/')?;
        let (seq, name) = rest.split_once('/')?;
        if !is_identifier(namespace) || name.is_empty() {
            return None;
        }
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let seq = seq.parse().ok()?;
        Some(Self {
            namespace,
            seq,
            name,
        })
    }

    /// True for image-unpack snapshots (`extract-<nanos>-<rand> <chainID>`), which are never persisted.
    #[must_use]
    pub fn is_extract(&self) -> bool {
        self.name.starts_with("extract-")
    }
}

/// containerd's identifier rule (`identifiers/validate.go`): 1-76 characters, alphanumeric
/// components joined by single `.`, `_` or `-`.
fn is_identifier(s: &str) -> bool {
    if s.is_empty() || s.len() > 76 {
        return false;
    }
    let bytes = s.as_bytes();
    let sep = |b: u8| matches!(b, b'.' | b'_' | b'-');
    if sep(bytes[0]) || sep(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut prev_sep = false;
    for &b in bytes {
        if sep(b) {
            if prev_sep {
                return false;
            }
            prev_sep = true;
        } else if b.is_ascii_alphanumeric() {
            prev_sep = false;
        } else {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_observed_from_containerd() {
        let k = BackendKey::parse("default/3/c1").unwrap();
        assert_eq!((k.namespace, k.seq, k.name), ("default", 3, "c1"));
        assert!(!k.is_extract());

        let k = BackendKey::parse("default/1/extract-239270438-d7Z2 sha256:5ddf").unwrap();
        assert_eq!(k.name, "extract-239270438-d7Z2 sha256:5ddf");
        assert!(k.is_extract());

        let k = BackendKey::parse("k8s.io/203/sha256:c00e").unwrap();
        assert_eq!((k.namespace, k.seq, k.name), ("k8s.io", 203, "sha256:c00e"));
    }

    #[test]
    fn the_name_keeps_further_slashes() {
        let k = BackendKey::parse("default/7/a/b/c").unwrap();
        assert_eq!(k.name, "a/b/c");
    }

    #[test]
    fn rejects_keys_not_from_the_metadata_layer() {
        for key in [
            "",
            "c1",
            "default/c1",
            "default//c1",
            "default/x1/c1",
            "default/-1/c1",
            "default/1/",
            "/1/c1",
            "/tmp/snapshot-suite-zlayer-1/work/preparing",
            "bad..ns/1/c1",
            "-ns/1/c1",
            "default/99999999999999999999999/c1",
        ] {
            assert_eq!(BackendKey::parse(key), None, "{key:?}");
        }
    }

    #[test]
    fn namespace_follows_the_identifier_rule() {
        assert!(is_identifier("a"));
        assert!(is_identifier("k8s.io"));
        assert!(is_identifier("my_ns-1.x"));
        assert!(!is_identifier("a__b"));
        assert!(!is_identifier("a."));
        assert!(!is_identifier(&"a".repeat(77)));
        assert!(is_identifier(&"a".repeat(76)));
    }
}
