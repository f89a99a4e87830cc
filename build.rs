//! Generates the containerd Snapshots server/client from the vendored protos in `proto/`, and
//! our own control API (`proto/zlayer/`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new("proto/containerd");
    let snapshots =
        root.join("github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[snapshots], &[root.to_path_buf()])?;
    // Our own messages print as JSON (`status --json`, `flush --json`).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .type_attribute(".zlayer.control.v1", "#[derive(serde::Serialize)]")
        .compile_protos(
            &["proto/zlayer/control/v1/control.proto"],
            &["proto/zlayer"],
        )?;
    Ok(())
}
