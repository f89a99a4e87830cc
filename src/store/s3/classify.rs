//! Error classification: an SDK error becomes a [`StoreError::S3`] carrying the HTTP status,
//! the S3 error code and whether a retry may help; the predicates below read those back.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::store::StoreError;

/// Turns an SDK error into a [`StoreError::S3`] with status, code and transience.
pub(crate) fn s3_err<E>(
    op: &'static str,
    location: String,
    e: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_string);
    let transient = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            status.is_some_and(|s| s >= 500 || s == 429 || s == 408)
                || code.as_deref().is_some_and(|c| {
                    matches!(
                        c,
                        "SlowDown"
                            | "Throttling"
                            | "ThrottlingException"
                            | "RequestTimeout"
                            | "InternalError"
                            | "ServiceUnavailable"
                    )
                })
        }
        _ => false,
    };
    StoreError::S3 {
        op,
        location,
        status,
        code,
        transient,
        source: Box::new(e),
    }
}

fn status_code(e: &StoreError) -> (Option<u16>, Option<&str>) {
    match e {
        StoreError::S3 { status, code, .. } => (*status, code.as_deref()),
        _ => (None, None),
    }
}

pub(crate) fn is_not_found(e: &StoreError) -> bool {
    let (status, code) = status_code(e);
    status == Some(404) || matches!(code, Some("NoSuchKey" | "NotFound" | "NoSuchUpload"))
}

pub(crate) fn is_precondition_failure(e: &StoreError) -> bool {
    let (status, code) = status_code(e);
    status == Some(412) || code == Some("PreconditionFailed")
}

pub(crate) fn is_conflict(e: &StoreError) -> bool {
    let (status, code) = status_code(e);
    status == Some(409) || code == Some("ConditionalRequestConflict")
}
