"""Ahead-of-time compile of the package's Triton kernels for a CUDA target, on a machine without a GPU.

    python benchmarks/compile_check.py                      # for sm_90 (H100/H200), a table on stdout
    python benchmarks/compile_check.py --out compile.jsonl  # also JSON lines and a markdown table (compile.md)

Each case calls the launchers of :mod:`din_kernels.triton` (attention, Dice, MBA) on small CPU tensors with a
stand-in driver that only names the target: every launch compiles its kernel (every autotune config that survives
the kernel's pruning) through Triton's own JIT path (the same specialisation, constexprs and options as on the GPU)
and launches nothing. Per compiled kernel it records the compile time, the registers per thread, the spill stores
and the stack frame that ``ptxas -v`` reports, and the shared memory; a kernel that fails to compile is a row with
its error. Exit status 1 when any kernel failed to compile, 0 otherwise.

Triton's on-disk cache (``TRITON_CACHE_DIR``) is a fresh temporary folder, so the compile times are those of a cold
GPU run. The launchers' outputs are garbage (nothing runs); the kernels' numerics
are tested under ``TRITON_INTERPRET=1`` and on a GPU (``tests/``, ``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class AttentionCase:
    B: int
    T: int
    D: int
    hidden: tuple[int, ...]
    activation: str
    normalization: str
    layout: str
    dtype: str
    training: bool = True
    grad_scores: bool = False


@dataclass(frozen=True)
class DiceCase:
    N: int
    C: int
    dtype: str
    mask: bool = False
    affine: bool = False
    alpha_scalar: bool = False


@dataclass(frozen=True)
class MBACase:
    K: int
    D: int
    M: int
    dtype: str


# every kernel and constexpr branch at least once, the widest blocks, float32/bfloat16/float16
CASES = {
    "attention": [
        AttentionCase(16, 200, 128, (80, 40), "sigmoid", "none", "padded", "bfloat16"),
        AttentionCase(16, 200, 128, (80, 40), "dice", "softmax", "jagged", "float32", grad_scores=True),
        AttentionCase(16, 50, 32, (24,), "prelu", "softmax", "padded", "float16"),
        AttentionCase(16, 50, 32, (24, 12), "relu", "none", "jagged", "float32"),
        AttentionCase(16, 50, 32, (24, 12), "dice", "none", "padded", "bfloat16", training=False),
        AttentionCase(16, 30, 256, (80, 40), "sigmoid", "softmax", "padded", "bfloat16"),
        AttentionCase(16, 30, 256, (80, 40), "sigmoid", "none", "padded", "float32"),  # refused on sm_90
    ],
    "dice": [DiceCase(4096, 200, "bfloat16", mask=True, affine=True), DiceCase(4096, 80, "float32"),
             DiceCase(4096, 3, "float16", alpha_scalar=True)],
    "mba": [MBACase(100_000, 64, 4096, "float32"), MBACase(1000, 300, 512, "bfloat16")],
}


# ------------------------------------------------------------------------------------------------ target, capture


class _TargetOnlyDriver:
    """Stands in for Triton's CUDA driver: it names the target and a device 0; nothing is ever launched."""

    def __init__(self, target):
        self.target = target

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class Recorder:
    """Patches ``JITFunction.run`` (compile only: ``warmup=True``) and ``Autotuner.run`` (every pruned config is
    compiled, none is timed) while active; records one row per newly compiled kernel."""

    def __init__(self, ptxas: str, arch: int):
        self.rows: list[dict] = []
        self.case = ""
        self.ptxas = ptxas
        self.arch = arch
        self._seen: set = set()

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        self._jit_run, self._tune_run = JITFunction.run, Autotuner.run
        rec = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            try:
                kernel = rec._jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - a compile error is a result
                rec._add(fn, args, kwargs, None, time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[-2000:]}")
                return None
            rec._add(fn, args, kwargs, kernel, time.perf_counter() - t0, None)
            return kernel

        def tune_run(tuner, *args, **kwargs):
            kwargs.pop("warmup", None)
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            tuner.nargs = None
            for cfg in configs:
                tuner.fn.run(*args, warmup=True, **kwargs, **cfg.all_kwargs())

        JITFunction.run, Autotuner.run = jit_run, tune_run
        return self

    def __exit__(self, *exc):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        JITFunction.run, Autotuner.run = self._jit_run, self._tune_run

    def _add(self, fn, args, kwargs, kernel, seconds, error):
        name = fn.__name__
        bound = {**dict(zip(fn.arg_names, args)), **kwargs}  # torch's launch wrapper passes constexprs by position
        constexprs = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}
        constexprs.update({k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs})
        row = {"case": self.case, "kernel": name, "constexprs": {k: str(v) for k, v in constexprs.items()}}
        if kernel is not None:
            key = (name, kernel.hash)
            if key in self._seen:
                return
            self._seen.add(key)
            row.update(seconds=round(seconds, 2), shared=int(kernel.metadata.shared),
                       num_warps=int(kernel.metadata.num_warps), **self._ptxas_report(kernel))
        else:
            row.update(seconds=round(seconds, 2), error=error)
        self.rows.append(row)
        status = "ERROR " + error.splitlines()[0][:160] if error else (
            f"{row['registers']} regs, {row['spill_stores']} B spilled, {row['shared']} B smem")
        print(f"  {name:<34} {row['seconds']:6.1f} s  {status}  {row['constexprs']}", flush=True)

    def _ptxas_report(self, kernel) -> dict:
        """``ptxas -v`` of the kernel's PTX: registers per thread, spill stores/loads and stack frame (bytes)."""
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            arch = f"sm_{self.arch}a" if self.arch >= 90 else f"sm_{self.arch}"
            out = subprocess.run([self.ptxas, "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True, timeout=600)
        text = out.stdout + out.stderr

        def grab(pattern: str) -> int:
            m = re.search(pattern, text)
            return int(m.group(1)) if m else -1

        return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
                "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame")}


# ------------------------------------------------------------------------------------------------------ the cases


class Unsupported(Exception):
    """A case that the backend's own checks refuse on the target (it raises ``ValueError`` there, before any launch)."""


def _run_attention(case: AttentionCase, gen) -> None:
    import torch

    from din_kernels.triton import attention as tra

    dt = getattr(torch, case.dtype)
    B, T, D = case.B, case.T, case.D
    widths = list(case.hidden)
    dims = [4 * D, *widths]
    weights = [torch.randn(h, d, generator=gen) * d ** -0.5 for d, h in zip(dims, [*widths, 1])]
    biases = [torch.randn(h, generator=gen) * 0.1 for h in [*widths, 1]]
    act_weights = [torch.rand(h, generator=gen) for h in widths] if case.activation in ("prelu", "dice") else []
    means = [torch.zeros(h) for h in widths] if case.activation == "dice" else []
    variances = [torch.ones(h) for h in widths] if case.activation == "dice" else []
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    q = torch.randn(B, D, generator=gen).to(dt)
    if case.layout == "jagged":
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        keys, lens, offs = torch.randn(int(offsets[-1]), D, generator=gen).to(dt), None, offsets
    else:
        keys, lens, offs = torch.randn(B, T, D, generator=gen).to(dt), lengths, None
    w = [x.to(dt) for x in weights]
    b = [x.to(dt) for x in biases]
    a = [x.to(dt) for x in act_weights]
    try:
        tra.check_supported(q, keys, w, smem_limit=tra.SM90_SMEM_PER_BLOCK)
    except ValueError as e:  # sizes that the backend refuses on sm_90
        raise Unsupported(str(e)) from e
    common = (q, keys, lens, offs, w, b, a, means, variances, case.activation, case.normalization, 0.5,
              case.training, 1e-8)
    out, scores, stats, w32, out32 = tra.target_attention_fwd(*common)
    go = torch.randn(out.shape, generator=gen).to(dt)
    gs = torch.randn(scores.shape, generator=gen).to(dt) if case.grad_scores else None
    tra.target_attention_bwd(go, gs, q, keys, lens, offs, w, b, a, means, variances, stats, w32, out32,
                             case.activation, case.normalization, 0.5, case.training, 1e-8)


def _run_dice(case: DiceCase, gen) -> None:
    import torch

    from din_kernels.triton import dice as trd

    dt = getattr(torch, case.dtype)
    x = torch.randn(case.N, case.C, generator=gen).to(dt)
    mask = torch.rand(case.N, generator=gen) < 0.3 if case.mask else None
    alpha = torch.rand(1 if case.alpha_scalar else case.C, generator=gen)
    weight = torch.randn(case.C, generator=gen) if case.affine else None
    bias = torch.randn(case.C, generator=gen) if case.affine else None
    stats = trd.batch_stats(x, mask, torch.float32)
    y = trd.dice_forward(x, alpha, weight, bias, stats, 1e-8)
    trd.update_running_stats(torch.zeros(case.C), torch.ones(case.C), stats, 0.1)
    for training in (True, False):
        trd.dice_backward(torch.randn(y.shape, generator=gen).to(dt), x, mask, alpha, weight, bias, stats, training,
                          1e-8)


def _run_mba(case: MBACase, gen) -> None:
    import torch

    from din_kernels.triton import mba as trm

    dt = getattr(torch, case.dtype)
    weight = torch.randn(case.K, case.D, generator=gen).to(dt)
    ids = torch.randint(0, case.K, (case.M,), generator=gen)
    counts = torch.randint(1, 10, (case.K,), generator=gen)
    grad_out = torch.randn(case.M, case.D, generator=gen).to(dt)
    trm.mba_l2_dense(weight, torch.zeros_like(weight), ids, counts, 1e-4, 0)
    segments = trm.sort_segments(ids)
    trm.mba_penalty(segments, weight, counts, 1e-4, None)
    trm.embedding_backward_dense(grad_out, segments, weight, counts, 1e-4, 0)
    trm.embedding_backward_sparse(grad_out, segments, weight, counts, 0.0, None)


RUNNERS = {"attention": _run_attention, "dice": _run_dice, "mba": _run_mba}

# constexprs shown in the markdown table (the rest are in the JSON lines)
_SHOWN = ("PREC", "MODE", "SPLIT_DQ", "LAYER", "NUM_LAYERS", "BLOCK_T", "BLOCK_D", "BLOCK_H1", "BLOCK_H2", "BLOCK_N",
          "BLOCK_C", "BLOCK_M")


def markdown(meta: dict, rows: list[dict]) -> str:
    """One table row per compiled kernel (and the refused cases), for ``benchmarks/results``."""
    out = [f"# Triton kernels compiled for sm_{meta['arch']} (no GPU: `python benchmarks/compile_check.py`)", "",
           f"triton {meta['triton']}, torch {meta['torch']}: {meta['kernels']} kernels in "
           f"{meta['seconds']} s, {meta['errors']} failed, {meta['spilling']} with register spills; "
           f"{meta['unsupported']} cases refused by the backend (shared memory). Shared memory per block on sm_90: "
           "232448 bytes.", "",
           "| kernel | config | warps | compile s | registers | spill stores B | shared B |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "unsupported" in r:
            out.append(f"| refused: {r['case']} | {r['unsupported']} | | | | | |")
            continue
        c = r["constexprs"]
        cfg = " ".join(f"{k}={c[k]}" for k in _SHOWN if k in c)
        if "error" in r:
            out.append(f"| `{r['kernel']}` | {cfg} | {c.get('num_warps', '')} | {r['seconds']} | error: "
                       f"{r['error'].splitlines()[0][:200]} | | |")
        else:
            out.append(f"| `{r['kernel']}` | {cfg} | {r['num_warps']} | {r['seconds']} | {r['registers']} | "
                       f"{r['spill_stores']} | {r['shared']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(RUNNERS), help="comma-separated subset of " + ",".join(RUNNERS))
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90 = sm_90)")
    p.add_argument("--out", help="write the rows as JSON lines to this file (and a markdown table next to it, .md)")
    args = p.parse_args(argv)

    tmp_cache = tempfile.TemporaryDirectory(prefix="din_kernels_compile_")
    os.environ["TRITON_CACHE_DIR"] = tmp_cache.name

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        sys.exit(f"compile_check: Triton's ptxas is missing at {ptxas}")
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}")
    gen = torch.Generator().manual_seed(0)
    rec = Recorder(ptxas, args.arch)
    t0 = time.perf_counter()
    try:
        with rec:
            for op in args.ops.split(","):
                for case in CASES[op]:
                    rec.case = f"{op} {case}"
                    print(rec.case, flush=True)
                    try:
                        RUNNERS[op](case, gen)
                    except Unsupported as e:
                        rec.rows.append({"case": rec.case, "unsupported": str(e)})
                        print(f"  unsupported: {e}", flush=True)
    finally:
        driver.set_active(None)  # back to the default driver, created on first use
        tmp_cache.cleanup()
    total = time.perf_counter() - t0
    unsupported = [r for r in rec.rows if "unsupported" in r]
    errors = [r for r in rec.rows if "error" in r]
    spilled = [r for r in rec.rows if r.get("spill_stores", 0) > 0]
    meta = {"summary": True, "triton": triton.__version__, "torch": torch.__version__, "arch": args.arch,
            "kernels": len(rec.rows) - len(unsupported), "unsupported": len(unsupported),
            "errors": len(errors), "spilling": len(spilled),
            "seconds": round(total, 1)}
    if args.out:
        with open(args.out, "w") as f:
            for row in [meta, *rec.rows]:
                f.write(json.dumps(row) + "\n")
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(meta, rec.rows))
    print(f"{meta['kernels']} kernels compiled for sm_{args.arch} in {total:.0f} s: {len(errors)} failed, "
          f"{len(spilled)} with register spills; {len(unsupported)} cases refused by the backend's own checks")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
