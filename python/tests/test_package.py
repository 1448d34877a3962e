"""The installed package: where it comes from, the compiled module, backends."""

import ast
import inspect
import os
import pathlib

import pytest

import flashmla
from conftest import FakeCudaTensor, require_gpu
from flashmla import _native


def test_imports_the_installed_wheel_with_its_compiled_module():
    if os.environ.get("FLASHMLA_EXPECT_INSTALLED") != "1":
        pytest.skip("not run by scripts/test-python.sh")
    path = pathlib.Path(flashmla.__file__).resolve()
    assert "site-packages" in path.parts, f"flashmla imported from {path}, not from the installed wheel"
    native = pathlib.Path(_native.__file__)
    assert native.parent == path.parent and native.name.endswith(".abi3.so"), native


def test_versions():
    assert flashmla.library_version() == flashmla.__version__


def test_the_hot_functions_are_the_compiled_ones():
    # No Python frame between the caller and the Rust API.
    assert flashmla.flash_mla_with_kvcache is _native.flash_mla_with_kvcache
    assert flashmla.get_mla_metadata is _native.get_mla_metadata


def _stub_tree():
    path = pathlib.Path(flashmla.__file__).with_name("_native.pyi")
    assert path.is_file(), f"{path}: the type stub is not installed with the package"
    return ast.parse(path.read_text())


def _stub_params(fn):
    """(name, kind, default) of a stub function's parameters, in inspect's terms."""
    a = fn.args
    P = inspect.Parameter
    out = [(x.arg, P.POSITIONAL_ONLY) for x in a.posonlyargs] + [(x.arg, P.POSITIONAL_OR_KEYWORD) for x in a.args]
    defaults = [P.empty] * (len(out) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
    params = [(n, k, d) for (n, k), d in zip(out, defaults)]
    if a.vararg:
        params.append((a.vararg.arg, P.VAR_POSITIONAL, P.empty))
    for x, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append((x.arg, P.KEYWORD_ONLY, P.empty if d is None else ast.literal_eval(d)))
    if a.kwarg:
        params.append((a.kwarg.arg, P.VAR_KEYWORD, P.empty))
    return params


def test_the_type_stub_matches_the_compiled_module():
    functions, names, properties = {}, set(), set()
    for node in _stub_tree().body:
        if isinstance(node, ast.FunctionDef):
            functions.setdefault(node.name, []).append(node)
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            assert node.name == "FlashMLASchedMeta", node.name
            properties = {f.name for f in node.body if isinstance(f, ast.FunctionDef) and f.name != "__init__"}
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    runtime = {n for n in dir(_native) if not n.startswith("__")} | {"__version__"}
    assert names == runtime, f"only in the stub: {names - runtime}; only in the module: {runtime - names}"
    cls = _native.FlashMLASchedMeta
    assert properties == {n for n in dir(cls) if not n.startswith("__")}
    for name, defs in functions.items():
        if len(defs) > 1:
            continue  # overloads: get_mla_metadata, checked below
        got = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(_native, name)).parameters.values()]
        assert _stub_params(defs[0]) == got, name


def test_get_mla_metadata_takes_the_stubs_keywords():
    import numpy as np

    overloads = [f for f in _stub_tree().body if isinstance(f, ast.FunctionDef) and f.name == "get_mla_metadata"]
    assert [len(f.args.args) for f in overloads] == [0, 3]
    kwargs = {a.arg: v for a, v in zip(overloads[1].args.args, [np.ones(2, dtype=np.int32), 1, 1])}
    meta, splits = _native.get_mla_metadata(**kwargs)
    assert splits.shape == (3,)
    sched, none = _native.get_mla_metadata()
    assert isinstance(sched, _native.FlashMLASchedMeta) and none is None


def test_cpu_backend_info():
    info = flashmla.backend_info("cpu")
    assert info["backend"] == "cpu"
    assert info["sm_count"] >= 1
    assert {"bf16", "fp16", "e4m3"} <= set(info["dtypes"])
    assert info["compute_capability"] is None
    assert info["page_sizes"] is None
    every = ["attn_sink", "topk_length", "extra_k_cache", "extra_topk_length"]
    assert info["fp8_cache"] == {"sparse": {"v32": every, "model1": every}, "dense": ["v32"]}


def test_gpu_backend_opens_or_says_why():
    try:
        info = flashmla.backend_info("cuda:0")
    except flashmla.BackendUnavailableError as e:
        if require_gpu():
            pytest.fail(f"FLASHMLA_REQUIRE_GPU=1 but the Hopper backend does not open: {e}")
        msg = str(e)
        assert isinstance(e, RuntimeError) and not isinstance(e, ValueError)
        assert e.status == "FLASHMLA_STATUS_UNAVAILABLE"
        assert "hopper" in msg and "cannot run on cuda:0: " in msg
        return
    assert info["backend"] == "hopper"
    assert info["compute_capability"][0] == 9


def test_bad_backend_device_string():
    with pytest.raises(ValueError, match="device"):
        flashmla.backend_info("tpu")


def test_cuda_inputs_without_a_usable_gpu_say_why():
    fake = FakeCudaTensor((4,))
    try:
        hopper_opens = flashmla.backend_info("cuda:0")["backend"] == "hopper"
    except flashmla.BackendUnavailableError:
        hopper_opens = False
    if hopper_opens:
        # Outputs are allocated with q's framework, so a non-torch CUDA array is refused by name.
        with pytest.raises(ValueError, match="torch.Tensor for CUDA inputs"):
            flashmla.get_mla_metadata(fake, 16, 1)
        return
    with pytest.raises(flashmla.BackendUnavailableError) as info:
        flashmla.get_mla_metadata(fake, 16, 1)
    msg = str(info.value)
    assert msg.startswith("get_mla_metadata: backend `hopper` is unavailable: CUDA tensors run on the `hopper`"), msg
    assert info.value.status == "FLASHMLA_STATUS_UNAVAILABLE"
