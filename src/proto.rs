//! Generated protobuf/gRPC code for the vendored containerd APIs.
//!
//! The module tree mirrors the protobuf packages so prost's relative paths resolve.

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

/// Our control API (`proto/zlayer/control/v1/control.proto`).
pub mod zlayer {
    pub mod control {
        pub mod v1 {
            tonic::include_proto!("zlayer.control.v1");
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
pub use zlayer::control::v1 as control;
