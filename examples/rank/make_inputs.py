"""Writes a random batch for a din_kernels rank package, as the C++ example (main.cpp) reads it.

    python examples/rank/make_inputs.py PACKAGE.pt2 INPUTS.pt [--users U] [--candidates C] [--max-len T]
        [--seed S] [--logits FILE]

INPUTS.pt is ``torch.save({name: int64 tensor})`` with the package's inputs (its metadata ``din_kernels.inputs``:
``hist``, ``hist_len`` or ``hist_offsets``, the user and context fields, ``candidates``, ``candidate_offsets``), ids
drawn from the package's table sizes (``din_kernels.serving.random_batch``). ``--logits`` also writes the logits of
the package run from Python (``din_kernels.load``), one a line, for comparison with the C++ program's output.
"""

from __future__ import annotations

import argparse
import json

import torch

import din_kernels
from din_kernels import serving


def write_inputs(package: str, out: str, users: int = 4, candidates: int = 3, max_len: int = 8, seed: int = 0,
                 logits: str | None = None) -> dict[str, torch.Tensor]:
    """The inputs written to ``out`` (``{name: tensor}``); ``logits``: also the Python package's logits there."""
    metadata = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(package, "model")
    vocab = json.loads(metadata[serving.META_VOCAB])
    batch, cands, offsets = serving.random_batch(vocab, metadata[serving.META_LAYOUT], users, candidates, max_len,
                                                 seed=seed)
    inputs = dict(batch, candidates=cands, candidate_offsets=offsets)
    torch.save({name: inputs[name] for name in metadata[serving.META_INPUTS].split(",")}, out)
    if logits is not None:
        values = din_kernels.load(package)(batch, cands, offsets)
        with open(logits, "w") as f:
            f.writelines(f"{v:.9g}\n" for v in values.tolist())
    return inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package")
    p.add_argument("out")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--candidates", type=int, default=3, help="candidates per user on average")
    p.add_argument("--max-len", type=int, default=8, help="the longest history")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logits", default=None, help="also write the Python package's logits to this file")
    a = p.parse_args()
    write_inputs(a.package, a.out, a.users, a.candidates, a.max_len, a.seed, a.logits)


if __name__ == "__main__":
    main()
