//! The shipped packaging files agree with the daemon: socket units with the names and paths it
//! uses, hook files that run the packaged binary (issue 8 §3, §7). The `.deb` built from them is
//! checked by `packaging/deb.sh` (run by `integration/test.sh`).

use std::path::PathBuf;

fn packaging() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging")
}

fn json(rel: &str) -> serde_json::Value {
    let path = packaging().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {rel}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not JSON: {e}"))
}

/// The shipped socket units listen where the default config says the sockets are, under the
/// names the daemon takes them by, and the service takes both.
#[test]
fn packaged_units_match_the_daemon() {
    use zlayer_storage::sys::systemd::{CONTROL_SOCKET, SNAPSHOTTER_SOCKET};
    let dir = packaging().join("systemd");
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    };
    let defaults = zlayer_storage::SnapshotterConfig::default();
    for (unit, fd_name, path) in [
        (
            "zlayer-snapshotter.socket",
            SNAPSHOTTER_SOCKET,
            &defaults.socket,
        ),
        (
            "zlayer-control.socket",
            CONTROL_SOCKET,
            &defaults.control_socket,
        ),
    ] {
        let text = read(unit);
        for line in [
            format!("ListenStream={}", path.display()),
            format!("FileDescriptorName={fd_name}"),
            "SocketMode=0660".to_string(),
            "Service=zlayer-snapshotter.service".to_string(),
            "Before=containerd.service".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{unit} lacks {line:?}");
        }
    }
    let service = read("zlayer-snapshotter.service");
    for line in [
        "Type=notify",
        "Restart=always",
        "Sockets=zlayer-snapshotter.socket zlayer-control.socket",
        "ExecStart=/usr/bin/zlayer-storage snapshotter",
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "zlayer-snapshotter.service lacks {line:?}"
        );
    }
}

/// The hooks.d file (oci-hooks 1.0.0) and the CRI base spec run the binary where the `.deb`
/// installs it, at poststop only, within CRI's 10 s task-delete budget.
#[test]
fn packaged_hooks_run_the_installed_binary_at_poststop() {
    let hook_args = serde_json::json!(["zlayer-storage", "hook", "poststop"]);
    let hooks_d = json("hooks.d/zlayer-storage.json");
    assert_eq!(hooks_d["version"], "1.0.0");
    assert_eq!(hooks_d["hook"]["path"], "/usr/bin/zlayer-storage");
    assert_eq!(hooks_d["hook"]["args"], hook_args);
    assert_eq!(hooks_d["stages"], serde_json::json!(["poststop"]));
    assert_eq!(hooks_d["when"], serde_json::json!({"always": true}));
    let spec = json("cri/base_runtime_spec.json");
    let poststop = spec["hooks"]["poststop"]
        .as_array()
        .expect("base spec has poststop hooks");
    assert_eq!(poststop.len(), 1, "{poststop:?}");
    assert_eq!(poststop[0]["path"], "/usr/bin/zlayer-storage");
    assert_eq!(poststop[0]["args"], hook_args);
    for (file, timeout) in [
        ("hooks.d", &hooks_d["hook"]["timeout"]),
        ("base spec", &poststop[0]["timeout"]),
    ] {
        let secs = timeout
            .as_u64()
            .unwrap_or_else(|| panic!("{file}: no timeout"));
        assert!((1..10).contains(&secs), "{file}: timeout {secs} s");
    }
}
