"""Shared fixtures. TRITON_INTERPRET=1 is set here, before any kernel module is imported, so every Triton kernel
runs on the CPU in CI."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from din_kernels import _alloc  # noqa: E402

# relative error by norm allowed against the float64 reference, by input dtype
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||a - e|| / max(||e||, 0.01)`` in float64: relative by norm, absolute for (near) zero references such as
    the last bias's gradient under softmax, which is exactly 0 in exact arithmetic."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return float((a - e).norm() / e.norm().clamp_min(1e-2))


def assert_close(actual, expected, dtype, name="", factor=1.0):
    assert actual is not None, f"{name}: no gradient"
    assert torch.isfinite(actual).all() or not torch.isfinite(expected).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    tol = TOLERANCES[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"


@pytest.fixture
def poison():
    """Fill freshly allocated outputs with NaN so an element a kernel forgets to write fails the test."""
    _alloc.poison = True
    yield
    _alloc.poison = False


@pytest.fixture(autouse=True)
def _gpu_only(request):
    """Tests marked ``gpu`` skip cleanly without a CUDA device (checked at run time, never at collection)."""
    if request.node.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
