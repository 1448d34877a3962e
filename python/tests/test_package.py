"""The installed package: where it comes from, the bundled library, backends."""

import os
import pathlib

import pytest

import flashmla
from conftest import FakeCudaTensor, require_gpu
from flashmla import _lib


def test_imports_the_installed_wheel_with_its_bundled_library():
    if os.environ.get("FLASHMLA_EXPECT_INSTALLED") != "1":
        pytest.skip("not run by scripts/test-python.sh")
    path = pathlib.Path(flashmla.__file__).resolve()
    assert "site-packages" in path.parts, f"flashmla imported from {path}, not from the installed wheel"
    lib = path.parent / "libflashmla.so"
    assert lib.is_file(), f"{lib} missing from the wheel"
    assert "FLASHMLA_LIBRARY" not in os.environ
    assert pathlib.Path(_lib.library_path()) == lib


def test_versions_and_abi():
    assert flashmla.library_version() == flashmla.__version__
    assert _lib.lib().flashmla_abi_version() == _lib.ABI_VERSION


def test_cpu_backend_info():
    info = flashmla.backend_info("cpu")
    assert info["backend"] == "cpu"
    assert info["sm_count"] >= 1
    assert {"bf16", "fp16", "e4m3"} <= set(info["dtypes"])
    assert info["compute_capability"] is None
    # The handle is opened once per (backend, device) and cached.
    assert _lib.backend("cpu", 0) is _lib.backend("cpu", 0)


def test_gpu_backend_opens_or_says_why():
    try:
        info = flashmla.backend_info("cuda:0")
    except flashmla.BackendUnavailableError as e:
        if require_gpu():
            pytest.fail(f"FLASHMLA_REQUIRE_GPU=1 but the Hopper backend does not open: {e}")
        msg = str(e)
        assert isinstance(e, RuntimeError) and not isinstance(e, ValueError)
        assert e.status == "FLASHMLA_STATUS_UNAVAILABLE"
        assert "hopper" in msg and len(msg) > len("flashmla_backend_open: backend `hopper` is unavailable: ")
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
    assert msg.startswith("get_mla_metadata: CUDA tensors run on the `hopper` backend"), msg
    assert "cannot run on cuda:0: flashmla_backend_open: backend `hopper` is unavailable: " in msg, msg
    assert info.value.status == "FLASHMLA_STATUS_UNAVAILABLE"
