//! The one error type of the library: a gRPC status code and a message.

use tonic::Code;

/// A failed call: the daemon unreachable, a request it refused, or a stream that
/// broke off. Displays as `CODE: MESSAGE` with the code's canonical name, e.g.
/// `INVALID_ARGUMENT: max_tokens: 0 is invalid; accepted: 1..2047`.
///
/// A guard halting a generation is not an error: that is a [`Verdict`](crate::Verdict).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code_name(*.code))]
pub struct Error {
    code: Code,
    message: String,
}

impl Error {
    /// An error with this code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The gRPC status code (the server's, or the one that fits a local failure:
    /// `UNAVAILABLE` when the daemon cannot be reached, `INVALID_ARGUMENT` for a
    /// malformed address, `UNKNOWN` for a stream that ended without a verdict).
    pub fn code(&self) -> Code {
        self.code
    }

    /// The server's message, or a description of the local failure.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// `UNAVAILABLE: cannot reach the daemon at ADDR (DETAIL)`.
    pub(crate) fn unreachable(addr: &str, detail: &str) -> Self {
        Self::new(
            Code::Unavailable,
            format!("cannot reach the daemon at {addr} ({detail})"),
        )
    }

    /// A status from a call to the daemon at `addr`. Transport failures become
    /// [`Error::unreachable`], so "the daemon is not there" reads the same whether
    /// it is noticed while connecting or during a call.
    pub(crate) fn from_status(addr: &str, status: tonic::Status) -> Self {
        use std::error::Error as _;
        let message = status.message();
        // A status that tonic made up from a transport failure carries that failure
        // as its source (one from the server never does); and the generated stub
        // reports a channel that cannot reconnect as UNKNOWN "Service was not
        // ready: ...". Both mean the daemon is not there (any more).
        let local = status.source().is_some() || message.starts_with("Service was not ready");
        if status.code() == Code::Unavailable || local {
            return Self::unreachable(addr, &transport_detail(&status, message));
        }
        Self::new(status.code(), message)
    }
}

/// What went wrong underneath a transport error, without tonic's generic
/// "transport error" wrapper: "No such file or directory (os error 2)".
pub(crate) fn transport_detail(err: &(dyn std::error::Error + 'static), what: &str) -> String {
    let detail = error_chain(err, what);
    match detail.strip_prefix("transport error: ") {
        Some(rest) => rest.to_string(),
        None => detail,
    }
}

/// `what` followed by the distinct messages of its sources, joined with ": ".
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static), what: &str) -> String {
    let mut text = what.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// The canonical name of a gRPC status code, as in the gRPC spec
/// (`INVALID_ARGUMENT`, `UNAVAILABLE`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_canonical_code_and_message() {
        let err = Error::new(Code::InvalidArgument, "top_p: 2 is invalid");
        assert_eq!(err.to_string(), "INVALID_ARGUMENT: top_p: 2 is invalid");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "top_p: 2 is invalid");
    }

    #[test]
    fn server_status_keeps_code_and_message() {
        let err = Error::from_status("unix:/x", tonic::Status::unauthenticated("bad token"));
        assert_eq!(err.to_string(), "UNAUTHENTICATED: bad token");
    }

    #[test]
    fn transport_failures_read_as_unreachable() {
        let err = Error::from_status(
            "127.0.0.1:1",
            tonic::Status::unavailable("connection refused"),
        );
        assert_eq!(
            err.to_string(),
            "UNAVAILABLE: cannot reach the daemon at 127.0.0.1:1 (connection refused)"
        );
        let err = Error::from_status(
            "unix:/x",
            tonic::Status::unknown("Service was not ready: transport error"),
        );
        assert_eq!(err.code(), Code::Unavailable);
    }
}
