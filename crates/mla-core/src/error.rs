//! The one error type of mla-core, shared by every backend through the [`crate::MlaBackend`] trait.

/// Everything that can go wrong in flashmla-rs, as seen by a caller.
///
/// Argument errors always name the argument, the expected value and the actual value, so that an engine can
/// surface them to its user unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A caller-supplied argument is wrong.
    #[error("invalid argument `{arg}`: expected {expected}, got {actual}")]
    InvalidArgument {
        /// The argument, e.g. `q.shape[3]` or `cache_seqlens[5]`.
        arg: String,
        /// What would have been accepted.
        expected: String,
        /// What was passed.
        actual: String,
    },
    /// The backend cannot run on this machine (no driver, no GPU, kernels not built).
    #[error("backend `{backend}` is unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: String,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// The backend runs here but does not support this device or configuration.
    #[error("backend `{backend}` does not support this: {reason}")]
    Unsupported {
        /// Backend name.
        backend: String,
        /// What is unsupported.
        reason: String,
    },
    /// A failure inside a backend after validation passed (a driver error, a launch failure).
    #[error("backend `{backend}` failed: {message}")]
    Backend {
        /// Backend name.
        backend: String,
        /// The backend's own description.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(arg: impl Into<String>, expected: impl ToString, actual: impl ToString) -> Self {
        Error::InvalidArgument { arg: arg.into(), expected: expected.to_string(), actual: actual.to_string() }
    }

    /// Shorthand for [`Error::Backend`].
    pub fn backend(backend: impl Into<String>, message: impl ToString) -> Self {
        Error::Backend { backend: backend.into(), message: message.to_string() }
    }

    /// True for errors caused by the caller's arguments (C ABI status `INVALID_ARGUMENT`).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Error::InvalidArgument { .. })
    }
}

/// Result alias used across flashmla-rs.
pub type Result<T, E = Error> = std::result::Result<T, E>;
