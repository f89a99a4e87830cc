//! Integration tests against real components (Garage, containerd, overlayfs).
//! Tests that need a component skip with a printed reason only when not in CI (`CI` unset);
//! in CI a missing component is a failure.

mod archive_overlay;
mod containerd_e2e;
mod containerd_restore;
mod layer_cli;
mod snapshotter_conformance;
mod store_s3;
mod store_stream;
mod util;
