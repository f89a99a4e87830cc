//! Conditional-write probe: whether the service enforces `If-None-Match`/`If-Match` (some
//! S3-compatible services accept the headers and ignore them). [`ObjectStore::put_bytes`]
//! emulates the conditions where they are not enforced.
//!
//! [`ObjectStore::put_bytes`]: crate::store::ObjectStore::put_bytes

use aws_sdk_s3::primitives::ByteStream;

use super::{S3Store, is_precondition_failure, s3_err};
use crate::store::ObjectStore;
use crate::store::error::Result;
use crate::store::local::RESERVED_PREFIX;

impl S3Store {
    /// Writes a sentinel twice with `If-None-Match: *`; a 412 on the second write means the
    /// service enforces preconditions (Garage 2.5, for one, silently ignores them).
    pub(super) async fn probe_conditional_writes(&self) -> Result<bool> {
        let key = format!(
            "{}{RESERVED_PREFIX}probe/{}",
            self.prefix,
            crate::util::unique_temp_name(b"conditional-write", "probe").to_string_lossy()
        );
        let put = || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .if_none_match("*")
                .body(ByteStream::from_static(b"probe"))
                .send()
        };
        put()
            .await
            .map_err(|e| s3_err("put (probe)", self.location(&key), e))?;
        let supported = match put().await {
            Ok(_) => false,
            Err(e) => {
                let err = s3_err("put (probe)", self.location(&key), e);
                if !is_precondition_failure(&err) {
                    return Err(err);
                }
                true
            }
        };
        if let Err(e) = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            tracing::warn!(key, error = %e, "cannot delete conditional-write probe object");
        }
        tracing::debug!(store = %self.describe(), supported, "probed conditional writes");
        Ok(supported)
    }
}
