"""Shared fixtures. TRITON_INTERPRET=1 is set here, before any kernel module is imported, so every Triton kernel
runs on the CPU in CI."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from din_kernels import _alloc  # noqa: E402
from din_kernels import backend as _backend  # noqa: E402

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# Relative error by norm (rel_err) allowed against the float64 reference, by backend and input dtype: about 2.5x the
# worst error measured over the cases of tests/test_attention.py, tests/test_dice.py and tests/test_triton_attention.py
# on the CPU (Triton under TRITON_INTERPRET=1), rounded up. Measured worst, and where:
#   torch   float64  1.6e-13 on the fixed cases; 3.9e-12 over 41 seeds of test_hypothesis_shapes (small batches,
#                    Dice in training: the statistics of a few positions amplify rounding)
#           float32  9.3e-6   d biases[1], sigmoid + softmax (test_torch_backend_dtypes)
#           bfloat16 3.0e-3   the Dice running statistics of the attention MLP
#           float16  3.8e-4   the same
#   triton  float64  9.0e-15  Dice only (the attention kernels refuse float64)
#           float32  1.5e-4   a single PReLU weight's gradient (test_single_prelu_weight_and_no_score_gradient): the
#                             kernels multiply float32 operands split into bfloat16 parts (about 17 significant bits,
#                             see din_kernels/triton/attention_kernels.py)
#           bfloat16 1.1e-2   d weights[1] with Dice (test_dtypes)
#           float16  1.1e-3   d biases[1] (test_dtypes)
#   cpu     float64  8.9e-14  d biases[2] (tests/test_cpu_kernels.py; the same Dice amplification as torch's applies)
#           float32  2.3e-6   d alpha
#           bfloat16 9.3e-3   d weights[3], 3 hidden layers: the forward's first layer multiplies bfloat16 operands (M_b
#                             rounded to bfloat16, csrc/cpu/gemm_bf16.h)
#           float16  3.6e-4   d biases[1]
# "reference" in a lower dtype (the literal formulas) and "cuda" start at torch's entries until measured. To measure: DIN_TEST_ERRORS=errors.jsonl pytest <files> (each comparison appends a line).
# The GPU tests of realistic sizes use the same table (not measured on a GPU yet).
_TORCH = {f64: 1e-11, f32: 2.5e-5, bf16: 8e-3, f16: 1e-3}
_TRITON = {f64: 2.5e-14, f32: 4e-4, bf16: 3e-2, f16: 3e-3}
_CPU = {f64: 1e-11, f32: 1e-5, bf16: 2.5e-2, f16: 1e-3}
TOLERANCES = {(backend, dtype): tol for backend, table in
              (("torch", _TORCH), ("triton", _TRITON), ("reference", _TORCH), ("cpu", _CPU), ("cuda", _TORCH))
              for dtype, tol in table.items()}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||a - e|| / max(||e||, 0.01)`` in float64: relative by norm, absolute for (near) zero references such as
    the last bias's gradient under softmax, which is exactly 0 in exact arithmetic."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return float((a - e).norm() / e.norm().clamp_min(1e-2))


def concrete_backend(backend: str, device: str = "cpu") -> str:
    """``backend``, with ``auto`` replaced by the backend it picks for target attention on ``device``."""
    if backend != "auto":
        return backend
    supported = ("reference", "torch", "triton", "cpu", "cuda")
    return _backend.resolve("auto", torch.device(device), "target_attention", supported)


def tolerance(dtype: torch.dtype, backend: str | None = None) -> float:
    """The entry of :data:`TOLERANCES`; without a backend the loosest of ``dtype``."""
    if backend is None:
        return max(tol for (_, d), tol in TOLERANCES.items() if d == dtype)
    return TOLERANCES[(concrete_backend(backend), dtype)]


_backend_param: str | None = None


@pytest.fixture(autouse=True)
def _record_backend(request):
    """The running test's ``backend`` parameter, the default backend of :func:`assert_close`."""
    global _backend_param
    callspec = getattr(request.node, "callspec", None)
    _backend_param = callspec.params.get("backend") if callspec is not None else None
    yield
    _backend_param = None


def assert_close(actual, expected, dtype, name="", factor=1.0, backend=None):
    """``rel_err(actual, expected)`` within ``factor`` times the tolerance of ``backend`` in ``dtype`` (by default
    the backend the test is parametrised with, else the loosest entry of ``dtype``)."""
    assert actual is not None, f"{name}: no gradient"
    assert torch.isfinite(actual).all() or not torch.isfinite(expected).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    backend = backend or _backend_param
    if os.environ.get("DIN_TEST_ERRORS"):
        with open(os.environ["DIN_TEST_ERRORS"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "name": name, "dtype": str(dtype),
                                "backend": backend and concrete_backend(backend), "err": err}) + "\n")
    tol = tolerance(dtype, backend) * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({backend}, {dtype})"


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
