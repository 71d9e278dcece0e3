//! Status codes and the thread-local last-error message.

use crate::error::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of every fallible call: `FT_OK` (0) or one of the `FT_ERR_*` codes.
pub type ft_status = i32;

pub const FT_OK: ft_status = 0;
/// A NULL pointer, a value out of range, or inconsistent arguments.
pub const FT_ERR_INVALID_ARGUMENT: ft_status = 1;
/// The operating system refused to read or write a file.
pub const FT_ERR_IO: ft_status = 2;
/// A file is malformed (safetensors header, config.json, adapter files).
pub const FT_ERR_FORMAT: ft_status = 3;
/// The model's architecture or a requested feature is not supported.
pub const FT_ERR_UNSUPPORTED: ft_status = 4;
/// An adapter does not fit the model.
pub const FT_ERR_ADAPTER_MISMATCH: ft_status = 5;
/// The progress callback asked to stop.
pub const FT_ERR_CANCELLED: ft_status = 6;
/// A loss or gradient was NaN or infinite; the adapter was not updated.
pub const FT_ERR_NON_FINITE: ft_status = 7;
/// A defect inside the library (a caught panic); the message says where.
pub const FT_ERR_INTERNAL: ft_status = 8;
/// The GPU, its driver or a CUDA library failed or is absent (the message names which).
pub const FT_ERR_DEVICE: ft_status = 9;
/// A device allocation did not fit; the message gives the size asked for. The objects involved
/// stay usable (a smaller batch may then work).
pub const FT_ERR_OUT_OF_MEMORY: ft_status = 10;
/// A data-parallel group failed: another rank returned an error, died or did not answer within
/// the group's timeout. The group is aborted (load the model again to train together); the call
/// returned instead of hanging.
pub const FT_ERR_COLLECTIVE: ft_status = 11;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).expect("NULs were replaced");
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(e: &Error) -> ft_status {
    match e {
        Error::InvalidArgument(_) => FT_ERR_INVALID_ARGUMENT,
        Error::Io { .. } => FT_ERR_IO,
        Error::Format { .. } | Error::MissingTensor { .. } => FT_ERR_FORMAT,
        Error::UnsupportedArchitecture(_) => FT_ERR_UNSUPPORTED,
        Error::AdapterMismatch(_) => FT_ERR_ADAPTER_MISMATCH,
        Error::Cancelled => FT_ERR_CANCELLED,
        Error::NonFinite(_) => FT_ERR_NON_FINITE,
        Error::Device(_) => FT_ERR_DEVICE,
        Error::OutOfMemory { .. } => FT_ERR_OUT_OF_MEMORY,
        Error::Collective(_) => FT_ERR_COLLECTIVE,
    }
}

/// Runs the body of an entry point: maps its error to a status and a message, and a panic to
/// `FT_ERR_INTERNAL`. On success the last error is cleared.
pub(super) fn guard(body: impl FnOnce() -> crate::Result<()>) -> ft_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            FT_OK
        }
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            status_of(&e)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error: {what}"));
            FT_ERR_INTERNAL
        }
    }
}

/// Runs a function that cannot report a status (a free), swallowing any panic.
pub(super) fn guard_void(body: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(body));
}

/// The message of the last failed call on this thread ("" after a successful one). The pointer
/// stays valid until the next `ft_*` call on the same thread; never free it.
#[no_mangle]
pub extern "C" fn ft_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A static name for a status code ("FT_OK", "FT_ERR_IO", ...).
#[no_mangle]
pub extern "C" fn ft_status_name(status: ft_status) -> *const c_char {
    let s: &'static str = match status {
        FT_OK => "FT_OK\0",
        FT_ERR_INVALID_ARGUMENT => "FT_ERR_INVALID_ARGUMENT\0",
        FT_ERR_IO => "FT_ERR_IO\0",
        FT_ERR_FORMAT => "FT_ERR_FORMAT\0",
        FT_ERR_UNSUPPORTED => "FT_ERR_UNSUPPORTED\0",
        FT_ERR_ADAPTER_MISMATCH => "FT_ERR_ADAPTER_MISMATCH\0",
        FT_ERR_CANCELLED => "FT_ERR_CANCELLED\0",
        FT_ERR_NON_FINITE => "FT_ERR_NON_FINITE\0",
        FT_ERR_INTERNAL => "FT_ERR_INTERNAL\0",
        FT_ERR_DEVICE => "FT_ERR_DEVICE\0",
        FT_ERR_OUT_OF_MEMORY => "FT_ERR_OUT_OF_MEMORY\0",
        FT_ERR_COLLECTIVE => "FT_ERR_COLLECTIVE\0",
        _ => "FT_ERR_UNKNOWN\0",
    };
    s.as_ptr().cast()
}
