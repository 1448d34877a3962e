"""The ctypes bindings (flashmla/_lib.py) agree with the C header include/flashmla.h: constants, enum values,
struct fields and function arities. A change of the ABI that the bindings do not follow fails here."""

import ctypes
import re

import pytest

from conftest import repo_root
from flashmla import _lib


@pytest.fixture(scope="module")
def header() -> str:
    path = repo_root() / "include" / "flashmla.h"
    if not path.is_file():
        pytest.fail(f"{path} is missing (the C ABI's header)")
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # block comments
    return re.sub(r"//[^\n]*", "", text)  # line comments


def constants(header: str) -> dict:
    """#define NAME value, and NAME = value inside enums."""
    found = {}
    for name, value in re.findall(r"#define\s+(FLASHMLA_\w+)\s+\(?\s*(-?\d+)[uUlL]*\s*\)?", header):
        found[name] = int(value)
    for name, value in re.findall(r"\b(FLASHMLA_\w+)\s*=\s*(-?\d+)", header):
        found[name] = int(value)
    return found


def struct_fields(header: str, name: str) -> list:
    m = re.search(r"typedef\s+struct\s+" + name + r"\s*\{(.*?)\}\s*" + name + r"\s*;", header, re.S)
    if m is None:
        m = re.search(r"struct\s+" + name + r"\s*\{(.*?)\}\s*;", header, re.S)
    assert m, f"struct {name} not found in the header"
    fields = []
    for decl in m.group(1).split(";"):
        decl = decl.strip()
        if decl:
            fields.append(re.match(r".*?(\w+)\s*(\[[^\]]*\])?$", decl, re.S).group(1))
    return fields


def functions(header: str) -> dict:
    """name -> number of parameters."""
    found = {}
    for name, params in re.findall(r"\b(flashmla_\w+)\s*\(([^;{]*?)\)\s*;", header, re.S):
        params = params.strip()
        found[name] = 0 if params in ("", "void") else params.count(",") + 1
    return found


def test_constants_match(header):
    c = constants(header)
    expected = {
        "FLASHMLA_ABI_VERSION": _lib.ABI_VERSION,
        "FLASHMLA_MAX_NDIM": _lib.MAX_NDIM,
        "FLASHMLA_METADATA_WORDS": _lib.METADATA_WORDS,
        "FLASHMLA_HEAD_DIM_K": _lib.HEAD_DIM_K,
        "FLASHMLA_HEAD_DIM_V": _lib.HEAD_DIM_V,
        "FLASHMLA_STATUS_OK": _lib.STATUS_OK,
        "FLASHMLA_STATUS_INVALID_ARGUMENT": _lib.STATUS_INVALID_ARGUMENT,
        "FLASHMLA_STATUS_UNSUPPORTED": _lib.STATUS_UNSUPPORTED,
        "FLASHMLA_STATUS_UNAVAILABLE": _lib.STATUS_UNAVAILABLE,
        "FLASHMLA_STATUS_BACKEND_ERROR": _lib.STATUS_BACKEND_ERROR,
        "FLASHMLA_STATUS_PANIC": _lib.STATUS_PANIC,
        "FLASHMLA_DTYPE_BF16": _lib.DTYPE_BF16,
        "FLASHMLA_DTYPE_FP16": _lib.DTYPE_FP16,
        "FLASHMLA_DTYPE_E4M3": _lib.DTYPE_E4M3,
        "FLASHMLA_DTYPE_F32": _lib.DTYPE_F32,
        "FLASHMLA_DTYPE_I32": _lib.DTYPE_I32,
        "FLASHMLA_DEVICE_TYPE_CPU": _lib.DEVICE_CPU,
        "FLASHMLA_DEVICE_TYPE_CUDA": _lib.DEVICE_CUDA,
    }
    missing = sorted(set(expected) - set(c))
    assert not missing, f"not in the header: {missing}"
    wrong = {k: (c[k], v) for k, v in expected.items() if c[k] != v}
    assert not wrong, f"header value != binding value: {wrong}"


def test_struct_fields_match(header):
    for struct, ctype in (
        ("flashmla_tensor", _lib.FlashmlaTensor),
        ("flashmla_capabilities", _lib.FlashmlaCapabilities),
    ):
        assert struct_fields(header, struct) == [f[0] for f in ctype._fields_], struct
    c = constants(header)
    caps = dict(_lib.FlashmlaCapabilities._fields_)
    assert caps["head_dims_k"]._length_ == c["FLASHMLA_MAX_HEAD_DIMS"]
    assert caps["page_sizes"]._length_ == c["FLASHMLA_MAX_PAGE_SIZES"]
    assert ctypes.sizeof(_lib.FlashmlaTensor) == 8 + 4 * 4 + 2 * 8 * _lib.MAX_NDIM


def test_function_arities_match(header):
    found = functions(header)
    for name, (_, argtypes) in _lib._PROTOTYPES.items():
        assert name in found, f"{name} is not declared in the header"
        assert found[name] == len(argtypes), f"{name}: header has {found[name]} parameters, bindings {len(argtypes)}"
