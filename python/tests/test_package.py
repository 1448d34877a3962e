"""The installed package: where it comes from, the compiled module, backends."""

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
