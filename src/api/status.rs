//! Domain errors → `tonic::Status`. Internal details are logged, never sent.

use tonic::Status;
use tracing::error;

use crate::audit::AuditError;
use crate::issuance::IssueError;
use crate::revocation::RevocationError;
use crate::store::StoreError;

use super::auth::AuthError;

/// Maps an issuance error.
pub fn issue(e: IssueError) -> Status {
    match e {
        IssueError::BadRequest(m) => Status::invalid_argument(m),
        IssueError::Unauthenticated(m) => Status::unauthenticated(m),
        IssueError::Denied(m) => Status::permission_denied(m),
        IssueError::Precondition(m) => Status::failed_precondition(m),
        IssueError::Internal(m) => internal(&m),
    }
}

/// Maps an authentication error.
pub fn auth(e: AuthError) -> Status {
    match e {
        AuthError::Revoked(m) => Status::failed_precondition(m),
        AuthError::MissingRole(m) => Status::permission_denied(m),
        AuthError::Internal(m) => internal(&m),
        other => Status::unauthenticated(other.to_string()),
    }
}

/// Maps a revocation error.
pub fn revocation(e: RevocationError) -> Status {
    match e {
        RevocationError::UnknownSerial(_) | RevocationError::NotRevoked(_) => {
            Status::not_found(e.to_string())
        }
        other => internal(&other.to_string()),
    }
}

/// Maps an access error.
pub fn access(e: crate::access::AccessError) -> Status {
    use crate::access::AccessError;
    match e {
        AccessError::Invalid(m) => Status::invalid_argument(m),
        AccessError::Forbidden(m) => Status::permission_denied(m),
        AccessError::NotFound(_) => Status::not_found(e.to_string()),
        AccessError::Conflict(m) => Status::failed_precondition(m),
        AccessError::Internal(m) => internal(&m),
    }
}

/// Maps a federation error: a malformed bundle or a wrong trust domain is the caller's fault;
/// encoding our own bundle or storing state is ours.
pub fn federation(e: crate::federation::FederationError) -> Status {
    use crate::federation::{BundleError, FederationError};
    match e {
        FederationError::Bundle(BundleError::Encode(m)) => internal(&m),
        FederationError::Bundle(b) => Status::invalid_argument(b.to_string()),
        FederationError::OwnTrustDomain(_) => Status::invalid_argument(e.to_string()),
        other => internal(&other.to_string()),
    }
}

/// Maps an audit error.
pub fn audit(e: AuditError) -> Status {
    internal(&e.to_string())
}

/// Maps a store error.
pub fn store(e: StoreError) -> Status {
    internal(&e.to_string())
}

/// An internal failure: `detail` is logged, the caller gets "internal error".
pub fn internal_error(detail: &str) -> Status {
    internal(detail)
}

fn internal(detail: &str) -> Status {
    error!(detail, "internal error");
    Status::internal("internal error")
}

/// Rewrites tonic's refusal of a request over `max_decoding_message_size` (OUT_OF_RANGE,
/// "decoded message length too large") as RESOURCE_EXHAUSTED, the code for a request beyond a
/// server limit, with a message that names the limit. Installed as a layer on the whole server:
/// the refusal comes from tonic's decoder, before any handler runs.
pub fn oversized_is_resource_exhausted<B>(
    mut resp: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    use tonic::codegen::http::HeaderValue;
    let headers = resp.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // Percent-encoded on the wire (spaces as %20).
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if oversized {
        let message = format!(
            "request too large: messages are limited to {} bytes",
            crate::server::MAX_REQUEST_BYTES
        );
        if let Ok(v) = HeaderValue::from_str(&message.replace(' ', "%20")) {
            headers.insert("grpc-status", HeaderValue::from_static("8"));
            headers.insert("grpc-message", v);
        }
    }
    resp
}
