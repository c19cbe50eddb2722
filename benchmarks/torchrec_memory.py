"""Memory per rank of a DIN whose goods table has ``--rows`` rows: replicated on every rank (the torch engine, DDP)
against sharded row-wise over the ranks (din_kernels.torchrec), after one SGD step (CPU, gloo).

    torchrun --standalone --nproc_per_node 2 benchmarks/torchrec_memory.py --mode replicated
    torchrun --standalone --nproc_per_node 2 benchmarks/torchrec_memory.py --mode sharded

Each rank prints one JSON line: the bytes of the goods table's weights this rank holds, of its gradient (dense
``[K, D]`` when replicated; none when sharded, where fbgemm's fused SGD updates the rows of the batch inside the
backward), of the MBA counts buffer (``[K]`` int64 on every rank in both modes), and the process's peak resident
memory. Needs the torchrec extra for ``--mode sharded``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from din_kernels import DIN
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic
from din_kernels.nn.din import FeatureSchema


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _schema(rows: int, dim: int) -> tuple[FeatureSchema, FeatureSchema]:
    """(the synthetic data's schema with a goods table of ``rows`` rows and width ``dim``, the same with every
    vocabulary 2)."""
    base = generate_synthetic(SyntheticConfig.tiny()).schema
    item = tuple(replace(f, vocab_size=rows, embed_dim=dim) if f.name == "goods_id" else f for f in base.item_fields)
    big = replace(base, item_fields=item)
    tiny = FeatureSchema(**{group: tuple(replace(f, vocab_size=2) for f in getattr(big, group))
                            for group in ("item_fields", "user_fields", "user_multi_fields", "context_fields")})
    return big, tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("replicated", "sharded"), required=True)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    big, tiny = _schema(args.rows, args.dim)
    data = generate_synthetic(SyntheticConfig.tiny())
    batch = data.batch("train", range(rank * args.batch_size, (rank + 1) * args.batch_size), "jagged")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if args.mode == "replicated":
        model = DIN(big, backend="torch")
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        table = model.tables["goods_id"]
    else:
        from din_kernels.torchrec import TorchRecModel, dense_optimizer, shard, state_dict

        model = TorchRecModel(DIN(tiny, backend="torch"), schema=big)
        net = shard(model, "row", optimizer="sgd", lr=0.01)
        opt = dense_optimizer(net, "sgd", lr=0.01)
    built = time.perf_counter() - t0
    loss = F.binary_cross_entropy_with_logits(net(batch), batch["label"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if args.mode == "replicated":
        weight_bytes = table.weight.numel() * table.weight.element_size()
        grad_bytes = table.weight.grad.numel() * table.weight.grad.element_size()
        counts_bytes = table.counts.numel() * table.counts.element_size()
    else:
        weight = state_dict(model)["tables.goods_id.weight"]
        weight_bytes = sum(s.tensor.numel() * s.tensor.element_size() for s in weight.local_shards())
        grad_bytes = 0
        counts = model.counts.goods_id
        counts_bytes = counts.numel() * counts.element_size()
    print(json.dumps({"mode": args.mode, "rank": rank, "world_size": world, "rows": args.rows, "dim": args.dim,
                      "table_weight_mb": weight_bytes / 2**20, "table_grad_mb": grad_bytes / 2**20,
                      "counts_mb": counts_bytes / 2**20, "peak_rss_mb": _peak_rss_mb(), "build_s": built,
                      "torch": torch.__version__, "host": os.uname().nodename}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
