"""The ranks of tests/test_torchrec.py's sharded runs (``torchrun --nproc_per_node N tests/torchrec_ranks.py ...``).

``steps OUT``: for each case (sharding, MBA strength) of :data:`CASES`, a DIN of the tiny synthetic data (seed 0)
sharded over the ranks, a few SGD steps on the global batches of ``iterate(world_size=N)``; rank 0 writes
``OUT/<case>.pt`` with each step's global loss, the dense gradients (after DDP's averaging), the MBA penalty and the
whole tables after the step; the last case also writes its state as a checkpoint ``OUT/checkpoint``.

``load CHECKPOINT OUT``: loads that checkpoint into a model sharded table-wise over these ranks and writes its whole
state (rank 0) to ``OUT``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from din_kernels import DIN
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic
from din_kernels.torchrec import TorchRecModel, dense_optimizer, full_state_dict, load, save, shard, state_dict

CASES = {"row": ("row", 0.0), "table": ("table", 0.0), "column-mba": ("column", 4.0), "row-mba": ("row", 4.0)}
BATCH, STEPS, LR = 16, 3, 0.2


def data():
    return generate_synthetic(SyntheticConfig.tiny(seed=1))


def din(d, mba_lambda: float = 0.0, counts=None) -> DIN:
    """The model of every run: seed 0, PReLU (no batch statistics), the torch backend."""
    torch.manual_seed(0)
    return DIN(d.schema, mba_lambda=mba_lambda, counts=counts, backend="torch")


def run_case(d, sharding: str, lam: float, out: str | None, checkpoint: str | None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = TorchRecModel(din(d, lam, d.table_counts("train") if lam else None))
    net = shard(model, sharding, optimizer="sgd", lr=LR)
    opt = dense_optimizer(net, "sgd", lr=LR)
    record = []
    for step, batch in enumerate(d.iterate("train", BATCH, shuffle=True, seed=7, rank=rank, world_size=world,
                                           drop_last=True, layout="jagged")):
        if step == STEPS:
            break
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(net(batch), batch["label"])
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.head.named_parameters()}
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        tables = full_state_dict({k: v for k, v in state_dict(model).items() if k.endswith(".weight")
                                  and k.startswith("tables.")})
        record.append({"loss": float(total) / world, "grads": grads, "tables": tables,
                       "penalty": float(model.mba_penalty())})
    if checkpoint:
        save({"model": state_dict(model)}, checkpoint)
    if rank == 0:
        torch.save(record, out)


def main(argv: list[str]) -> int:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    d = data()
    if argv[0] == "steps":
        folder = argv[1]
        names = list(CASES)
        for name in names:
            sharding, lam = CASES[name]
            checkpoint = os.path.join(folder, "checkpoint") if name == names[-1] else None
            run_case(d, sharding, lam, os.path.join(folder, f"{name}.pt"), checkpoint)
    elif argv[0] == "load":
        model = TorchRecModel(din(d, 4.0, d.table_counts("train")))
        shard(model, "table", optimizer="sgd", lr=LR)
        state = load({"model": state_dict(model)}, argv[1])["model"]
        whole = full_state_dict(state)
        if dist.get_rank() == 0:
            torch.save(whole, argv[2])
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
