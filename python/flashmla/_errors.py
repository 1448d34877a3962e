"""Exceptions raised by :mod:`flashmla`.

Every failure of the C library carries the library's own message (it names the argument, the expected and the
actual value) and the name of its status code in ``.status``:

==================================  ===============================  ===========================================
exception                           is a                             raised for
==================================  ===============================  ===========================================
:class:`FlashMLAValueError`         ``ValueError``                   ``FLASHMLA_STATUS_INVALID_ARGUMENT``
:class:`UnsupportedError`           ``RuntimeError``                 ``FLASHMLA_STATUS_UNSUPPORTED``
:class:`BackendUnavailableError`    ``RuntimeError``                 ``FLASHMLA_STATUS_UNAVAILABLE``
:class:`FlashMLARuntimeError`       ``RuntimeError``                 ``FLASHMLA_STATUS_BACKEND_ERROR``, ``_PANIC``
==================================  ===============================  ===========================================

All of them derive from :class:`FlashMLAError`, so ``except flashmla.FlashMLAError`` catches every library error.

Argument errors detected in Python before the library is reached (an array type or dtype that cannot be described
to the library at all) are :class:`FlashMLAValueError` too, with messages in the library's format.
"""

from __future__ import annotations

from typing import Optional


class FlashMLAError(Exception):
    """Base of every error of :mod:`flashmla`. ``status`` is the C status name, e.g.
    ``"FLASHMLA_STATUS_INVALID_ARGUMENT"``."""

    def __init__(self, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.status = status


class FlashMLAValueError(FlashMLAError, ValueError):
    """An invalid argument (dtype, shape, stride, device, value). Catch it as ``ValueError``."""


class FlashMLARuntimeError(FlashMLAError, RuntimeError):
    """A failure after the arguments were accepted (a CUDA driver or launch error, a caught panic)."""


class UnsupportedError(FlashMLARuntimeError):
    """The backend runs here but does not support this configuration."""


class BackendUnavailableError(FlashMLARuntimeError):
    """The backend cannot run on this machine (no CUDA driver, no suitable GPU, kernels not built). The message
    says why."""


def invalid(func: str, arg: str, expected: str, actual: str) -> FlashMLAValueError:
    """A :class:`FlashMLAValueError` worded like the library's own messages."""
    return FlashMLAValueError(
        f"{func}: invalid argument `{arg}`: expected {expected}, got {actual}",
        status="FLASHMLA_STATUS_INVALID_ARGUMENT",
    )
