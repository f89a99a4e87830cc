//! Integration tests against real components (Garage, containerd, overlayfs).
//! A test that needs a missing component fails naming it, unless `ZLAYER_TESTS_ALLOW_MISSING=1`
//! (then it skips); see `util::require`. `integration/test.sh` installs everything and runs them.

mod archive_hostile;
mod archive_overlay;
mod containerd_checkpoint;
mod containerd_e2e;
mod containerd_events;
mod containerd_restore;
mod control;
mod freezer;
mod hook;
mod hook_runc;
mod layer_cli;
mod metrics_endpoint;
mod packaging;
mod snapshotter_conformance;
mod socket_activation;
mod sqlite_replication;
mod store_s3;
mod store_stream;
mod util;
