//! Library errors as the package's Python exceptions (`python/flashmla/_errors.py`).
//!
//! | [`Error`] | exception | `status` |
//! |---|---|---|
//! | `InvalidArgument` | `FlashMLAValueError` (a `ValueError`) | `FLASHMLA_STATUS_INVALID_ARGUMENT` |
//! | `Unsupported` | `UnsupportedError` (a `RuntimeError`) | `FLASHMLA_STATUS_UNSUPPORTED` |
//! | `Unavailable` | `BackendUnavailableError` (a `RuntimeError`) | `FLASHMLA_STATUS_UNAVAILABLE` |
//! | `Backend` | `FlashMLARuntimeError` (a `RuntimeError`) | `FLASHMLA_STATUS_BACKEND_ERROR` |
//!
//! The exception classes live in Python because they need multiple inheritance (`FlashMLAValueError` is both a
//! `FlashMLAError` and a `ValueError`), which PyO3's `create_exception!` cannot express. The status names are the C
//! ABI's, so code that handles both interfaces sees one vocabulary.

use flashmla::Error;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static VALUE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static UNSUPPORTED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static UNAVAILABLE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static RUNTIME_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

const ERRORS_MODULE: &str = "flashmla._errors";

fn raise(py: Python<'_>, cell: &'static PyOnceLock<Py<PyType>>, class: &str, message: String, status: &str) -> PyErr {
    match cell.import(py, ERRORS_MODULE, class) {
        Ok(cls) => match cls.call1((message, status)) {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

/// `func: <the library's message>` as the matching exception.
pub fn to_py(py: Python<'_>, func: &str, e: Error) -> PyErr {
    let message = format!("{func}: {e}");
    match e {
        Error::InvalidArgument { .. } => {
            raise(py, &VALUE_ERROR, "FlashMLAValueError", message, "FLASHMLA_STATUS_INVALID_ARGUMENT")
        }
        Error::Unsupported { .. } => {
            raise(py, &UNSUPPORTED, "UnsupportedError", message, "FLASHMLA_STATUS_UNSUPPORTED")
        }
        Error::Unavailable { .. } => {
            raise(py, &UNAVAILABLE, "BackendUnavailableError", message, "FLASHMLA_STATUS_UNAVAILABLE")
        }
        Error::Backend { .. } => {
            raise(py, &RUNTIME_ERROR, "FlashMLARuntimeError", message, "FLASHMLA_STATUS_BACKEND_ERROR")
        }
    }
}

/// An argument error worded like the library's own: `func: invalid argument `arg`: expected …, got …`.
pub fn invalid(
    py: Python<'_>,
    func: &str,
    arg: impl Into<String>,
    expected: impl ToString,
    actual: impl ToString,
) -> PyErr {
    to_py(py, func, Error::invalid(arg, expected, actual))
}

/// `Result<T, Error>` → `PyResult<T>` with [`to_py`].
pub trait OrRaise<T> {
    /// Converts the library's error into the package's exception, prefixed with `func`.
    fn or_raise(self, py: Python<'_>, func: &str) -> PyResult<T>;
}

impl<T> OrRaise<T> for Result<T, Error> {
    fn or_raise(self, py: Python<'_>, func: &str) -> PyResult<T> {
        self.map_err(|e| to_py(py, func, e))
    }
}
