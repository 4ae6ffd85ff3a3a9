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
        IssueError::Missing(m) => Status::not_found(m),
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
        AccessError::Raced(m) => Status::aborted(m),
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
    match e {
        AuditError::Conflict => Status::aborted(e.to_string()),
        AuditError::Store(s) => store(s),
        other => internal(&other.to_string()),
    }
}

/// Maps a store error.
pub fn store(e: StoreError) -> Status {
    match e {
        // The caller asked for what was archived, or an archive that is not this log's: both
        // are theirs to fix (read from the checkpoint on, export again).
        StoreError::Archived { .. } | StoreError::ArchiveMismatch(_) => {
            Status::failed_precondition(e.to_string())
        }
        other => internal(&other.to_string()),
    }
}

/// An internal failure: `detail` is logged, the caller gets "internal error".
pub fn internal_error(detail: &str) -> Status {
    internal(detail)
}

fn internal(detail: &str) -> Status {
    error!(detail, "internal error");
    Status::internal("internal error")
}

/// How tonic's request decoder words the faults of a malformed request, which it reports as
/// INTERNAL (following gRPC's status-code table for a *peer's* bad bytes). Lanyard's own
/// internal errors always read "internal error", so these prefixes never match a server fault.
const MALFORMED_REQUEST: &[&str] = &[
    "failed to decode Protobuf message",
    "protocol error: received message with",
    "Unexpected EOF decoding stream",
    "Error decompressing",
];

/// Gives the client's own faults, which tonic's decoder reports before any handler runs, the
/// codes the API documents: a request over `max_decoding_message_size` (tonic: OUT_OF_RANGE)
/// becomes RESOURCE_EXHAUSTED naming the limit, and a malformed message (tonic: INTERNAL, which
/// the docs reserve for server faults) becomes INVALID_ARGUMENT. Installed as a layer on the
/// whole server; such refusals always travel in the response head.
pub fn client_faults_keep_their_codes<B>(
    mut resp: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let Some(status) = Status::from_header_map(resp.headers()) else {
        return resp;
    };
    let message = status.message();
    let rewritten = match status.code() {
        tonic::Code::OutOfRange if message.contains("message length too large") => {
            Status::resource_exhausted(format!(
                "request too large: messages are limited to {} bytes",
                crate::server::MAX_REQUEST_BYTES
            ))
        }
        tonic::Code::Internal if MALFORMED_REQUEST.iter().any(|p| message.starts_with(p)) => {
            Status::invalid_argument(format!(
                "malformed request: {message}; send a message encoded as the .proto in the API docs says"
            ))
        }
        _ => return resp,
    };
    if let Err(e) = rewritten.add_header(resp.headers_mut()) {
        error!(error = %e, "cannot rewrite a status header");
    }
    resp
}
