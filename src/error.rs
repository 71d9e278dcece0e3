//! The library's error type. Every fallible public function returns [`Result`]; the C API turns an
//! [`Error`] into a status code plus the thread-local message from `ft_last_error`.

use std::path::PathBuf;

/// Everything that can go wrong, each variant carrying enough context (file, field, tensor name) for
/// the message alone to tell the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument was outside its allowed range or inconsistent with another.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Reading or writing a file failed at the operating-system level.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was readable but its content is malformed (bad header, offsets, JSON, ...).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// The model directory or file names an architecture this library does not implement.
    #[error("unsupported architecture {0:?} (supported: llama, mistral, qwen2, qwen3, gemma)")]
    UnsupportedArchitecture(String),
    /// A tensor the architecture needs is absent from the weight files.
    #[error("missing tensor {name:?} in {path}")]
    MissingTensor { name: String, path: PathBuf },
    /// An adapter does not fit the model it is attached to.
    #[error("adapter does not fit the model: {0}")]
    AdapterMismatch(String),
    /// A long-running call was cancelled by its progress callback.
    #[error("cancelled")]
    Cancelled,
    /// A loss or gradient was NaN or infinite; the update was not applied.
    #[error("non-finite {0}: the update was skipped")]
    NonFinite(String),
    /// The GPU (driver, kernel compiler, BLAS library) reported a failure or is absent.
    #[error("device: {0}")]
    Device(String),
    /// A device allocation did not fit; the state from before the failing call is intact.
    #[error("out of device memory: {requested} bytes asked for {what} ({detail})")]
    OutOfMemory {
        requested: usize,
        what: String,
        detail: String,
    },
    /// A data-parallel group failed: a rank returned an error, died or did not answer within the
    /// group's timeout. The group is aborted; the model must be loaded again to train together.
    #[error("data-parallel group: {0}")]
    Collective(String),
}

impl Error {
    /// Wraps an `std::io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed-content error for `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
