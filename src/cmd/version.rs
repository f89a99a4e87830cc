//! `zlayer-storage version`

/// Prints the crate version, the build's git revision when known, and the archive format.
pub fn run() {
    let rev = option_env!("ZLAYER_GIT_SHA").unwrap_or("unknown");
    println!("zlayer-storage {} (git {rev})", env!("CARGO_PKG_VERSION"));
    println!(
        "archive format: {} v{}, zstd {}",
        zlayer_storage::layer::TAR_FORMAT,
        zlayer_storage::layer::TAR_FORMAT_VERSION,
        zlayer_storage::layer::zstd_library_version()
    );
}
