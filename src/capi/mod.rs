//! The C ABI: the only `extern "C"` code of the library. Each function checks its pointers,
//! converts its arguments, calls the Rust API and turns the outcome into an `ft_status`, with the
//! message kept for `ft_last_error`. No panic crosses the boundary: every entry point runs under
//! `catch_unwind`.
#![allow(non_camel_case_types)]
// The entry points take raw pointers from C, where `unsafe fn` would add nothing: every pointer is
// checked for NULL before use, and the header states what each must point to.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod bench;
mod errors;
mod model;
mod params;
mod run;
mod trainer;

pub use bench::*;
pub use errors::*;
pub use model::*;
pub use params::*;
pub use run::*;
pub use trainer::*;

use crate::error::{Error, Result};
use std::ffi::{c_char, CStr, CString};
use std::path::Path;

/// Version of this C ABI. It changes only when an existing declaration changes incompatibly.
pub const FT_ABI_VERSION: u32 = 5;

/// Returns `FT_ABI_VERSION` as compiled into the library (compare with the header's).
#[no_mangle]
pub extern "C" fn ft_abi_version() -> u32 {
    FT_ABI_VERSION
}

/// The library's version, a static NUL-terminated string such as "0.1.0".
#[no_mangle]
pub extern "C" fn ft_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Releases a string the library allocated for the caller (the JSON of `ft_bench`). NULL is
/// ignored. Never pass it other strings: not `ft_last_error`, `ft_version` or `ft_status_name`
/// (static or owned by the library), nor memory from malloc.
#[no_mangle]
pub extern "C" fn ft_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: the pointer came from CString::into_raw in `string_out`.
        guard_void(|| drop(unsafe { CString::from_raw(s) }));
    }
}

/// Hands `s` to the caller through `out` as a NUL-terminated string it frees with
/// `ft_string_free`.
fn string_out(s: String, out: &mut *mut c_char) {
    *out = CString::new(s)
        .expect("strings the library returns hold no NUL")
        .into_raw();
}

/// A UTF-8 string argument; NULL and invalid UTF-8 are errors naming the argument.
fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: the caller promises a NUL-terminated string valid for the duration of the call.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::InvalidArgument(format!("{what} is not valid UTF-8")))
}

fn path_arg<'a>(p: *const c_char, what: &str) -> Result<&'a Path> {
    str_arg(p, what).map(Path::new)
}

/// A shared reference argument; NULL is an error naming it.
fn ref_arg<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: non-NULL pointers must point to a live object of the documented type.
    unsafe { p.as_ref() }.ok_or_else(|| Error::InvalidArgument(format!("{what} is NULL")))
}

/// A mutable reference argument; NULL is an error naming it.
fn mut_arg<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: as for `ref_arg`, and the caller does not use the object elsewhere during the call.
    unsafe { p.as_mut() }.ok_or_else(|| Error::InvalidArgument(format!("{what} is NULL")))
}

/// `len` values at `p`; NULL with a non-zero length is an error naming the argument.
fn slice_arg<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: the caller promises `len` readable values at `p`.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}
