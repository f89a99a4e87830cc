//! Generates the containerd Snapshots server/client from the vendored protos in `proto/`, and
//! our own control API (`proto/zlayer/`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new("proto/containerd");
    let snapshots =
        root.join("github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto");
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[snapshots], &[root.to_path_buf()])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &["proto/zlayer/control/v1/control.proto"],
            &["proto/zlayer"],
        )?;
    Ok(())
}
