"""Eager ``DIN.rank`` against its AOTInductor package, side by side on the same inputs (CPU).

    python examples/rank/bench.py [--users 64] [--candidates 200] [--max-len 100] [--threads 1 2]
        [--layout padded] [--backend auto] [--cpp build/examples-rank/rank] [--package FILE.pt2]

A DIN (dice activation, the synthetic data set's schema: D = 16, attention hidden (36,), MLP (200, 80)) with random
weights; every user has ``--max-len`` behaviours and ``--candidates`` candidates. Prints one JSON line per
(provider, checks, threads, round): ``eager`` (``model.rank`` in eval under ``torch.no_grad``), ``package``
(``din_kernels.load(path)(...)``, which runs the same input checks as eager while they are on) and, with ``--cpp``, the
C++ example (``package_cpp``, its own median of 50 ``AOTIModelPackageLoader::run`` calls, no checks); the rounds
interleave them, then one line each with the best median over the rounds. Times are medians of
``torch.utils.benchmark.Timer.blocked_autorange``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import tempfile

import torch
from torch.utils.benchmark import Timer

import din_kernels
from din_kernels import serving
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def rank_inputs(model: din_kernels.DIN, layout: str, users: int, candidates: int, max_len: int,
                seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(batch, candidates [U * candidates, F], candidate_offsets [U + 1])``: every user with ``max_len``
    behaviours and ``candidates`` candidates, random ids."""
    g = torch.Generator().manual_seed(seed)
    vocab = serving.input_vocab(model, layout)
    batch, _, _ = serving.random_batch(vocab, layout, users, 1, max_len, seed=seed)  # the user and context fields
    items = lambda n: torch.stack([torch.randint(1, K, (n,), generator=g) for K in vocab["hist"]], -1)  # noqa: E731
    if layout == "padded":
        batch["hist"], batch["hist_len"] = items(users * max_len).reshape(users, max_len, -1), torch.full((users,),
                                                                                                          max_len)
    else:
        batch["hist"], batch["hist_offsets"] = items(users * max_len), torch.arange(users + 1) * max_len
    return batch, items(users * candidates), torch.arange(users + 1) * candidates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--candidates", type=int, default=200, help="candidates per user")
    p.add_argument("--max-len", type=int, default=100, help="behaviours per user (T)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layout", choices=("padded", "jagged"), default="padded")
    p.add_argument("--backend", default="auto")
    p.add_argument("--cpp", default=None, help="the built C++ example (examples/rank) to time as well")
    p.add_argument("--package", default=None, help="where to write the package (default: a temporary file)")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every provider; the best median is reported")
    a = p.parse_args()

    torch.manual_seed(0)
    schema = generate_synthetic(SyntheticConfig(num_users=100)).schema
    model = din_kernels.DIN(schema, activation="dice", backend=a.backend).eval()
    folder = tempfile.mkdtemp()
    path = a.package or os.path.join(folder, "rank.pt2")
    example = serving.random_batch(serving.input_vocab(model, a.layout), a.layout)
    serving.export(model, example[0], path, example[1], example[2])
    package = din_kernels.load(path)
    batch, cands, offsets = rank_inputs(model, a.layout, a.users, a.candidates, a.max_len)
    with torch.no_grad():
        want = model.rank(batch, cands, offsets)
    got = package(batch, cands, offsets)
    shape = {"U": a.users, "N": a.users * a.candidates, "T": a.max_len, "layout": a.layout, "backend": a.backend,
             "compiled_ops": package.metadata[serving.META_OPS], "max_abs_diff": float((got - want).abs().max())}
    common = {"op": "rank", **shape, "torch": torch.__version__, "git": _git()}
    calls = {"eager": lambda: model.rank(batch, cands, offsets), "package": lambda: package(batch, cands, offsets)}
    inputs = os.path.join(folder, "inputs.pt")
    torch.save({n: t for n, t in zip(package.input_names, package.inputs(batch, cands, offsets))}, inputs)
    extension = importlib.import_module("din_kernels._C").__file__
    best: dict[tuple, float] = {}
    for r in range(a.rounds):  # rounds interleave the providers, so a busy machine slows them alike
        for threads in a.threads:
            torch.set_num_threads(threads)
            rows = []
            for checks in (True, False):
                for provider, fn in calls.items():
                    with torch.no_grad(), din_kernels.checks(checks):
                        m = Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
                            min_run_time=a.min_run_time)
                    rows.append((provider, checks, m.median * 1e3))
            if a.cpp:
                run = subprocess.run([a.cpp, path, extension, inputs, str(threads), "50"], capture_output=True,
                                     text=True, check=True)
                rows.append(("package_cpp", False, float(run.stderr.split("median_ms")[1].split()[0])))
            for provider, checks, ms in rows:
                key = (provider, checks, threads)
                best[key] = min(best.get(key, ms), ms)
                print(json.dumps({**common, "provider": provider, "checks": checks, "threads": threads, "round": r,
                                  "median_ms": round(ms, 3)}), flush=True)
    for (provider, checks, threads), ms in best.items():
        print(json.dumps({**common, "provider": provider, "checks": checks, "threads": threads,
                          "best_median_ms": round(ms, 3)}), flush=True)

if __name__ == "__main__":
    main()
