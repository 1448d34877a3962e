//! Status codes, the thread-local last error, and the panic boundary every entry point runs inside.
//!
//! | step | what happens |
//! |---|---|
//! | body returns `Ok(())` | status `FLASHMLA_STATUS_OK`, last error cleared to `""` |
//! | body returns `Err(e)` | status from [`status_of`] (the one mapping of [`mla_core::Error`]), message kept |
//! | body panics | unwinding stops here: status `FLASHMLA_STATUS_PANIC`, panic message kept |
//!
//! The message is stored per thread, so concurrent callers never see each other's errors; the pointer returned by
//! [`flashmla_last_error_message`] stays valid until the next `flashmla_*` call on the same thread.

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use mla_core::Error;

/// Result of every fallible `flashmla_*` call. In C it is an `int32_t`; the values never change within an ABI
/// version.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum flashmla_status {
    /// Success.
    Ok = 0,
    /// An argument is wrong (null pointer, dtype, shape, stride, size, device, value); nothing was written.
    InvalidArgument = 1,
    /// The backend works on this machine but not for this configuration (dtype, head dims, device).
    Unsupported = 2,
    /// The backend cannot run here: no CUDA driver or library, no device, kernels not built.
    Unavailable = 3,
    /// The backend failed after validation passed (a CUDA driver or launch error).
    BackendError = 4,
    /// A bug: a Rust panic was caught at the ABI boundary. The message says where.
    Panic = 5,
}

impl flashmla_status {
    /// The constant's name as spelt in the header.
    pub const fn name(self) -> &'static str {
        match self {
            flashmla_status::Ok => "FLASHMLA_STATUS_OK",
            flashmla_status::InvalidArgument => "FLASHMLA_STATUS_INVALID_ARGUMENT",
            flashmla_status::Unsupported => "FLASHMLA_STATUS_UNSUPPORTED",
            flashmla_status::Unavailable => "FLASHMLA_STATUS_UNAVAILABLE",
            flashmla_status::BackendError => "FLASHMLA_STATUS_BACKEND_ERROR",
            flashmla_status::Panic => "FLASHMLA_STATUS_PANIC",
        }
    }

    /// NUL-terminated [`flashmla_status::name`], for C.
    const fn c_name(self) -> &'static std::ffi::CStr {
        match self {
            flashmla_status::Ok => c"FLASHMLA_STATUS_OK",
            flashmla_status::InvalidArgument => c"FLASHMLA_STATUS_INVALID_ARGUMENT",
            flashmla_status::Unsupported => c"FLASHMLA_STATUS_UNSUPPORTED",
            flashmla_status::Unavailable => c"FLASHMLA_STATUS_UNAVAILABLE",
            flashmla_status::BackendError => c"FLASHMLA_STATUS_BACKEND_ERROR",
            flashmla_status::Panic => c"FLASHMLA_STATUS_PANIC",
        }
    }
}

/// The one place where a [`mla_core::Error`] becomes a status code.
pub fn status_of(err: &Error) -> flashmla_status {
    match err {
        Error::InvalidArgument { .. } => flashmla_status::InvalidArgument,
        Error::Unsupported { .. } => flashmla_status::Unsupported,
        Error::Unavailable { .. } => flashmla_status::Unavailable,
        Error::Backend { .. } => flashmla_status::BackendError,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Stores `message` as this thread's last error (interior NULs become spaces, so it always fits a C string).
fn set_last_error(message: String) {
    let bytes: Vec<u8> = message.into_bytes().into_iter().map(|b| if b == 0 { b' ' } else { b }).collect();
    let c = CString::new(bytes).unwrap_or_default();
    // `try_with` fails only while the thread is being torn down; there is no one left to read the message then.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = c);
}

/// Best-effort text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// Runs the body of entry point `func`: catches panics, maps errors, records the message.
///
/// Every `flashmla_*` function that returns a status is `boundary("flashmla_…", || { … })`.
pub(crate) fn boundary(func: &str, body: impl FnOnce() -> mla_core::Result<()>) -> flashmla_status {
    // AssertUnwindSafe: after a panic the only state we keep is the message; the caller's buffers are in an
    // unspecified state exactly as after a failed call, which the status tells them.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error(String::new());
            flashmla_status::Ok
        }
        Ok(Err(e)) => {
            set_last_error(format!("{func}: {e}"));
            status_of(&e)
        }
        Err(payload) => {
            set_last_error(format!("{func}: panic: {}", panic_message(payload.as_ref())));
            flashmla_status::Panic
        }
    }
}

/// The message of the last failed `flashmla_*` call on this thread, or `""` if the last call succeeded.
///
/// Never NULL. The string is owned by the library and stays valid until the next `flashmla_*` call on the same
/// thread (calling this function again does not invalidate it). Messages name the offending argument, e.g.
/// ``flashmla_with_kvcache: invalid argument `q.shape[3]`: expected 576, got 512``.
#[unsafe(no_mangle)]
pub extern "C" fn flashmla_last_error_message() -> *const c_char {
    // Reading the pointer out of the thread-local cannot panic; the CString is only replaced by the next call.
    LAST_ERROR.try_with(|slot| slot.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// The name of a status code (`"FLASHMLA_STATUS_OK"`, ...), or `"FLASHMLA_STATUS_UNKNOWN"`. Never NULL; static.
#[unsafe(no_mangle)]
pub extern "C" fn flashmla_status_name(status: i32) -> *const c_char {
    const ALL: [flashmla_status; 6] = [
        flashmla_status::Ok,
        flashmla_status::InvalidArgument,
        flashmla_status::Unsupported,
        flashmla_status::Unavailable,
        flashmla_status::BackendError,
        flashmla_status::Panic,
    ];
    match ALL.iter().find(|s| **s as i32 == status) {
        Some(s) => s.c_name().as_ptr(),
        None => c"FLASHMLA_STATUS_UNKNOWN".as_ptr(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: the pointer is valid until the next flashmla call on this thread; we copy it at once.
        unsafe { CStr::from_ptr(flashmla_last_error_message()) }.to_str().unwrap().to_owned()
    }

    #[test]
    fn boundary_maps_errors_panics_and_success() {
        let s = boundary("f", || Err(Error::invalid("q.ndim", 4, 3)));
        assert_eq!(s, flashmla_status::InvalidArgument);
        assert_eq!(last(), "f: invalid argument `q.ndim`: expected 4, got 3");
        let s = boundary("g", || panic!("boom {}", 7));
        assert_eq!(s, flashmla_status::Panic);
        assert_eq!(last(), "g: panic: boom 7");
        let s = boundary("h", || Err(Error::Unavailable { backend: "hopper".into(), reason: "no driver".into() }));
        assert_eq!(s, flashmla_status::Unavailable);
        assert_eq!(boundary("i", || Ok(())), flashmla_status::Ok);
        assert_eq!(last(), "");
    }

    #[test]
    fn messages_with_nul_survive() {
        boundary("f", || Err(Error::backend("x", "a\0b")));
        assert_eq!(last(), "f: backend `x` failed: a b");
    }

    #[test]
    fn status_names_match_header_constants() {
        // SAFETY: static NUL-terminated strings.
        let name = |s: i32| unsafe { CStr::from_ptr(flashmla_status_name(s)) }.to_str().unwrap().to_owned();
        assert_eq!(name(0), "FLASHMLA_STATUS_OK");
        assert_eq!(name(flashmla_status::Panic as i32), flashmla_status::Panic.name());
        assert_eq!(name(99), "FLASHMLA_STATUS_UNKNOWN");
        assert_eq!(name(-1), "FLASHMLA_STATUS_UNKNOWN");
    }
}
