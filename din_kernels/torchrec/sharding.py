"""Sharding a :class:`~din_kernels.torchrec.TorchRecModel` over the ranks of a process group with TorchRec's
``DistributedModelParallel``: the tables row-, table- or column-wise on fbgemm's fused kernels (the optimizer runs
inside their backward, on the rank that holds each row), the dense modules under ``DistributedDataParallel``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from .model import TorchRecModel
from .state import init_tables_, load_tables_

SHARDINGS = ("row", "table", "column")
# the optimizers of the tables (fbgemm's fused kernels) and of the dense modules (torch.optim), with the settings
# that make the two follow the same update; fbgemm's CPU kernels have no Adam
FUSED = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD, "adam": EmbOptimType.ADAM}
CPU_FUSED = ("sgd", "adagrad")
DENSE = {"sgd": (torch.optim.SGD, {}), "adagrad": (torch.optim.Adagrad, {"eps": 1e-10}),
         "adam": (torch.optim.Adam, {"eps": 1e-8})}


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _fused_params(optimizer: str, lr: float, device: torch.device) -> dict:
    if optimizer not in FUSED:
        raise ValueError(f"optimizer must be one of {tuple(FUSED)}, got {optimizer!r}")
    if device.type == "cpu" and optimizer not in CPU_FUSED:
        raise ValueError(f"optimizer {optimizer!r}: fbgemm's CPU embedding kernels have no fused {optimizer} "
                         f"(they have {CPU_FUSED}); use one of those, or GPUs")
    params = {"optimizer": FUSED[optimizer], "learning_rate": lr}
    params.update({k: v for k, v in DENSE[optimizer][1].items()})
    if optimizer == "adam":
        params.update(beta1=0.9, beta2=0.999)
    return params


def _table_ranks(fields, world_size: int) -> dict[str, int]:
    """Table-wise placement: the largest tables first, each on the rank with the fewest parameters so far."""
    load = [0] * world_size
    ranks = {}
    for f in sorted(fields, key=lambda f: (-f.vocab_size * f.embed_dim, f.name)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        ranks[f.name] = rank
        load[rank] += f.vocab_size * f.embed_dim
    return ranks


def sharding_plan(model: TorchRecModel, sharding: str, world_size: int, sharder: EmbeddingCollectionSharder,
                  device_type: str = "cpu") -> ShardingPlan:
    """The plan of every table of ``model`` over ``world_size`` ranks, on fbgemm's fused kernels:

    - ``row``: each table's rows split evenly over the ranks;
    - ``table``: each table whole on one rank, the largest first on the least loaded rank;
    - ``column``: each table's columns split evenly over the ranks where its width divides into multiples of 4,
      the other tables table-wise.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    fields = {f.name: f for f in model.schema.all_fields()}
    ranks = _table_ranks(fields.values(), world_size)
    kernel = "fused"
    plans = {}
    for key, collection in model.tables.items():
        per_table = {}
        for config in collection.embedding_configs():
            f = fields[config.name]
            if sharding == "row":
                per_table[f.name] = row_wise(compute_kernel=kernel)
            elif sharding == "column" and world_size > 1 and f.embed_dim % (4 * world_size) == 0:
                per_table[f.name] = column_wise(ranks=list(range(world_size)), compute_kernel=kernel)
            else:
                per_table[f.name] = table_wise(rank=ranks[f.name], compute_kernel=kernel)
        plans[f"tables.{key}"] = construct_module_sharding_plan(collection, per_table, sharder=sharder,
                                                                local_size=world_size, world_size=world_size,
                                                                device_type=device_type)
    return ShardingPlan(plans)


def shard(model: TorchRecModel, sharding: str = "row", optimizer: str = "sgd", lr: float = 0.01,
          device: torch.device | str | None = None, group: dist.ProcessGroup | None = None,
          init_std: float = 0.05, seed: int = 0) -> DistributedModelParallel:
    """``model`` sharded over the ranks of ``group`` (default: the whole world; the process group must exist):
    ``DistributedModelParallel`` with the plan of :func:`sharding_plan`, the tables' ``optimizer`` (``sgd``,
    ``adagrad``; ``adam`` on GPUs) fused into their backward with learning rate ``lr``, the dense modules under DDP.
    The shards get the initial weights ``model`` was built with (when its tables are on ``meta``), else are drawn by
    :func:`~din_kernels.torchrec.init_tables_` (``init_std``, ``seed``) without a whole table on any rank.

    Returns the ``DistributedModelParallel``; ``model`` is the module it wraps (its tables now sharded). Pair it
    with :func:`dense_optimizer` for the dense modules."""
    group = group or dist.group.WORLD
    device = torch.device(device) if device is not None else default_device()
    world_size = dist.get_world_size(group)
    sharder = EmbeddingCollectionSharder(fused_params=_fused_params(optimizer, lr, device))
    plan = sharding_plan(model, sharding, world_size, sharder, device.type)
    net = DistributedModelParallel(model, env=ShardingEnv.from_process_group(group), device=device, plan=plan,
                                   sharders=[sharder])
    if model.initial is not None:
        load_tables_(model, model.initial)
        model.initial = None
    else:
        init_tables_(model, init_std, seed)
    # TorchRec divides the gradients its all-to-all returns by the world size (get_gradient_division): the
    # tables' gradient is then the mean over the ranks' losses, as DDP's of the dense modules. MBA's term is
    # added before that division, so it is multiplied by the world size.
    model.group = group
    divided = get_gradient_division()
    model.grad_scale = 1.0 if divided else 1.0 / world_size
    model.mba_scale = float(world_size) if divided else 1.0
    return net


def dense_optimizer(net: DistributedModelParallel, optimizer: str = "sgd", lr: float = 0.01) -> CombinedOptimizer:
    """One optimizer for ``net``: ``torch.optim`` ``optimizer`` on the dense parameters, combined with the tables'
    fused optimizer (whose ``step`` is a no-op: the tables are updated in the backward). Its ``state_dict`` holds
    both, the tables' state sharded."""
    if optimizer not in DENSE:
        raise ValueError(f"optimizer must be one of {tuple(DENSE)}, got {optimizer!r}")
    cls, kw = DENSE[optimizer]
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(net.named_parameters())),
                                  lambda params: cls(params, lr=lr, **kw))
    return CombinedOptimizer([net.fused_optimizer, dense])
