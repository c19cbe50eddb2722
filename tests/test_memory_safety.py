"""Memory safety with the value checks off (SPEC section 5): ``tests/fuzz_memory.py`` fuzzes every op family on
every backend available here in a process of its own, so that a crash (a signal, heap corruption) is a failed test
and not a dead test run. The families run side by side; each has a fixed hypothesis seed and a bounded number of
examples (about 10 s each on two cores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import din_kernels as dk
from din_kernels import _jagged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "fuzz_memory.py")
EXAMPLES = {"attention": 100, "dice": 40, "mba": 60, "embedding": 50, "models": 100}
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def fuzz_runs(tmp_path_factory):
    """``{family: (process, log path)}``: every family started at once (each process runs single-threaded)."""
    logs = tmp_path_factory.mktemp("fuzz_memory")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    runs = {}
    for family, examples in EXAMPLES.items():
        log = logs / f"{family}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, SCRIPT, family, str(examples)], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        runs[family] = (proc, log)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_no_crash_or_error_with_checks_off(fuzz_runs, family):
    proc, log = fuzz_runs[family]
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{family}: no result after {TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    if rc < 0:
        pytest.fail(f"{family}: the process died of {signal.Signals(-rc).name} (a memory error):\n{text[-4000:]}")
    assert rc == 0, f"{family}: exit status {rc}:\n{text[-6000:]}"
    assert f"{family}: {EXAMPLES[family]} examples" in text


def test_base_model_pools_only_covered_rows_of_invalid_offsets():
    """The sum pooling of a jagged batch clamps its offsets like every op (rows no sample covers get weight 0)."""
    import torch

    from din_kernels.nn.din import FeatureSchema, Field

    schema = FeatureSchema(item_fields=(Field("goods", 9, 3),))
    model = dk.BaseModel(schema, mlp_hidden=(4,), backend="torch")
    hist = torch.randn(6, 3)
    for offsets in ([0, 3, 99, 6], [0, 4, 2, 6], [2, 3, 4, 5], [-5, 2, 4, 100]):
        offsets = torch.tensor(offsets)
        pooled, weights = model.interest(torch.zeros(3, 3), hist, None, offsets, return_scores=True)
        safe = _jagged.safe_offsets(offsets, 6)
        want = torch.stack([hist[safe[b] : safe[b + 1]].sum(0) for b in range(3)])
        covered = (torch.arange(6) >= safe[0]) & (torch.arange(6) < safe[-1])
        torch.testing.assert_close(pooled, want)
        assert torch.equal(weights, covered.float())
