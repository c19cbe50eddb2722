"""pytest-benchmark suites of din_kernels: ``pytest benchmarks/ --benchmark-only``.

Each test times one provider of one op at one shape, dtype and mode (the providers and inputs of
:mod:`benchmarks.cases`, the same as ``make bench``), grouped so that pytest-benchmark compares the providers of a
case side by side; ``extra_info`` carries the row's floor (:mod:`benchmarks.floor`). A provider that cannot run here
is skipped with its reason.

Environment: ``DIN_BENCH_SHAPES`` (``quick``, the default here, | ``default`` | ``full`` | ``gpu``),
``DIN_BENCH_DEVICE`` (``cpu`` | ``cuda``; default cuda when present), ``DIN_BENCH_ROUNDS`` (timed rounds, default 5).
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/run.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

SHAPE_SET = os.environ.get("DIN_BENCH_SHAPES", "quick")
ROUNDS = int(os.environ.get("DIN_BENCH_ROUNDS", "5"))


def bench_device() -> torch.device:
    name = os.environ.get("DIN_BENCH_DEVICE")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def shapes(op: str) -> list[dict]:
    from benchmarks.cases import SHAPE_SETS

    return SHAPE_SETS[SHAPE_SET][op]


@pytest.fixture(scope="session")
def peaks():
    """The device's measured peaks, once per session (for the floor of each test's ``extra_info``)."""
    from benchmarks import floor

    return floor.measure_peaks(bench_device(), (torch.float32,), min_run_time=0.2)


@pytest.fixture
def run_case(benchmark, peaks):
    """``run_case(op, provider, shape, mode, dtype=torch.float32)``: skips with the reason when the provider cannot
    run here, else times the mode's callable with ``benchmark.pedantic``."""
    import din_kernels
    from benchmarks import cases

    def run(op, provider, shape, mode, dtype=torch.float32):
        device = bench_device()
        reason = cases.provider_unavailable_reason(op, provider, device, dtype, shape)
        if reason is not None:
            pytest.skip(reason)
        with din_kernels.checks(False):
            wl = cases.build(op, provider, shape, dtype, device)
            fn = wl.setups[mode]()
            if device.type == "cuda":
                def timed():
                    fn()
                    torch.cuda.synchronize()
            else:
                timed = fn
            benchmark.group = f"{op} {cases.shape_label(op, shape)} {cases.dtype_name(dtype)} {mode}"
            cost = cases.cost(op, shape, mode, dtype, wl.info)
            benchmark.extra_info.update({"op": op, "provider": provider, "mode": mode, **shape, **wl.info,
                                         "dtype": cases.dtype_name(dtype), "device": peaks.device,
                                         "flops": cost.flops, "bytes": cost.bytes,
                                         "floor_ms": peaks.floor_ms(cost, "float32")})
            benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)
            wl.zero()
        cases.clear_cache()

    return run
