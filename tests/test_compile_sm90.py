"""The Triton kernels compiled ahead of time for sm_90 (H100/H200) on a machine without a GPU.

``benchmarks/compile_check.py`` runs every launcher of din_kernels.triton through Triton's own JIT path with a
stand-in driver for an sm_90 target (``TRITON_INTERPRET`` unset, in a subprocess): every kernel must compile, fit
in the shared memory of a block, and stay within the shared-memory model that picks configs and refuses sizes.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

from din_kernels.triton import attention_smem  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "sm90.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--arch", "90",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def _estimate(row) -> int:
    """The backend's own estimate (``_config_smem``, what ``_prune`` uses) for a compiled attention kernel."""
    kwargs = {k: (v == "True" if v in ("True", "False") else v if k == "PREC" else int(v))
              for k, v in row["constexprs"].items()}
    return attention_smem._config_smem(SimpleNamespace(kwargs={"BLOCK_T": kwargs["BLOCK_T"]}), kwargs)


def test_every_kernel_compiles_for_sm90(rows):
    summary, kernels = rows[0], [r for r in rows[1:] if "kernel" in r]
    assert summary["errors"] == 0, [r for r in kernels if "error" in r]
    names = {r["kernel"] for r in kernels}
    for name in ("_target_attention_fwd_kernel", "_target_attention_bwd_kernel", "_target_attention_stats_kernel",
                 "_dice_stats_partial_kernel", "_dice_fwd_kernel", "_dice_bwd_reduce_kernel", "_dice_bwd_kernel",
                 "_mba_segment_kernel"):
        assert name in names
    # both backward schemes: dq in the same launch (bfloat16) and split off (float32 at D = 128)
    bwd = [r["constexprs"] for r in kernels if r["kernel"] == "_target_attention_bwd_kernel"]
    modes = (attention_smem.MODE_GRADS, attention_smem.MODE_DICE_SUMS_TOP, attention_smem.MODE_DICE_SUMS_LAYER1,
             attention_smem.MODE_DQ_ONLY)
    assert {c["MODE"] for c in bwd} >= {str(m.value) for m in modes}


def test_shared_memory_fits_and_model_bounds_it(rows):
    for r in rows[1:]:
        if "kernel" not in r:
            continue
        assert r["shared"] <= attention_smem.SM90_SMEM_PER_BLOCK, r
        if r["kernel"].startswith("_target_attention") and int(r["constexprs"]["BLOCK_D"]) >= 128:
            assert r["shared"] <= _estimate(r) <= 1.35 * r["shared"], (r, _estimate(r))


def test_sizes_beyond_shared_memory_are_refused(rows):
    refused = [r for r in rows[1:] if "unsupported" in r]
    assert len(refused) == 1 and "D=256" in refused[0]["case"] and "float32" in refused[0]["case"]
    assert "shared memory" in refused[0]["unsupported"]
