"""The state of a :class:`~din_kernels.torchrec.TorchRecModel` under the names of :class:`din_kernels.BaseModel`.

``state_dict(model)`` names every tensor as the model's single-process twin does (``tables.<field>.weight``,
``tables.<field>.counts``, ``mlp.0.weight``, ``attention.layers.0.weight``, ...), a sharded table as a
``ShardedTensor``. Saved with :func:`save` (``torch.distributed.checkpoint``: every rank writes its own shards),
it loads on any number of ranks and any sharding (:func:`load` into a :class:`TorchRecModel`'s ``state_dict``), and
into a plain ``DIN`` / ``BaseModel`` on one process without TorchRec::

    state = {"model": din.state_dict()}
    torch.distributed.checkpoint.load(state, checkpoint_id=path)
    din.load_state_dict(state["model"])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

from .model import TorchRecModel

ROWS_PER_BLOCK = 1 << 16  # rows of one random block of init_tables_


def state_dict(model: TorchRecModel) -> dict[str, Tensor | ShardedTensor]:
    """``model``'s parameters and buffers under the names of :class:`din_kernels.BaseModel` (views, not copies);
    sharded tables as ``ShardedTensor``s."""
    out: dict[str, Tensor | ShardedTensor] = {}
    for key, value in model.state_dict().items():
        group, _, rest = key.partition(".")
        if group == "tables":  # tables.dim<D>.embeddings.<field>.weight
            field, leaf = rest.split(".")[2:4]
            out[f"tables.{field}.{leaf}"] = value
        elif group == "counts":
            out[f"tables.{rest}.counts"] = value
        elif group == "head":
            out[rest] = value
    return out


def _slices(shard: Shard) -> tuple[slice, slice]:
    (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
    return slice(r, r + h), slice(c, c + w)


@torch.no_grad()
def _copy_into(name: str, dst: Tensor | ShardedTensor, src: Tensor | ShardedTensor) -> None:
    if tuple(dst.size()) != tuple(src.size()):
        raise ValueError(f"{name}: the state has shape {tuple(src.size())}, the model {tuple(dst.size())}")
    if not isinstance(dst, ShardedTensor):
        if isinstance(src, ShardedTensor):
            raise ValueError(f"{name}: a sharded tensor cannot be copied into an unsharded one (load a sharded "
                             "checkpoint with din_kernels.torchrec.load)")
        dst.copy_(src)
        return
    if isinstance(src, ShardedTensor):
        here = {tuple(s.metadata.shard_offsets): s.tensor for s in src.local_shards()}
        for shard in dst.local_shards():
            key = tuple(shard.metadata.shard_offsets)
            if key not in here:
                raise ValueError(f"{name}: the state's shards are not this model's (load a checkpoint of another "
                                 "sharding with din_kernels.torchrec.load)")
            shard.tensor.copy_(here[key])
        return
    for shard in dst.local_shards():
        rows, cols = _slices(shard)
        shard.tensor.copy_(src[rows, cols])


def load_state_dict_(model: TorchRecModel, state: Mapping[str, Tensor | ShardedTensor]) -> None:
    """Copies ``state`` (BaseModel names: a ``DIN``'s own ``state_dict``, with whole tables, or that of a
    :class:`TorchRecModel` of the same sharding) into ``model``; each rank copies the rows of its own shards."""
    target = state_dict(model)
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise KeyError(f"state does not match the model: missing {missing}, unexpected {unexpected}")
    for name, dst in target.items():
        _copy_into(name, dst, state[name])


def load_tables_(model: TorchRecModel, weights: Mapping[str, Tensor]) -> None:
    """Copies whole tables ``{field: [K, D]}`` into ``model``'s tables (each rank its shards' rows and columns)."""
    target = state_dict(model)
    for field, weight in weights.items():
        _copy_into(f"tables.{field}.weight", target[f"tables.{field}.weight"], weight)


@torch.no_grad()
def init_tables_(model: TorchRecModel, std: float = 0.05, seed: int = 0) -> None:
    """Draws every table ``~ N(0, std)`` (row 0, the padding id, zero) without building a whole table anywhere:
    the rows come in blocks of :data:`ROWS_PER_BLOCK`, block b of table t from a generator seeded by
    ``(seed, t, b)``, and each rank draws only the blocks its shards cover. The result does not depend on the
    sharding nor on the number of ranks."""
    target = state_dict(model)
    for t, field in enumerate(model.schema.all_fields()):
        weight = target[f"tables.{field.name}.weight"]
        parts = weight.local_shards() if isinstance(weight, ShardedTensor) else [None]
        for shard in parts:
            dst = weight if shard is None else shard.tensor
            rows, cols = (slice(0, field.vocab_size), slice(0, field.embed_dim)) if shard is None else _slices(shard)
            for b in range(rows.start // ROWS_PER_BLOCK, -(-rows.stop // ROWS_PER_BLOCK)):
                lo, hi = b * ROWS_PER_BLOCK, min((b + 1) * ROWS_PER_BLOCK, field.vocab_size)
                gen = torch.Generator().manual_seed(hash((seed, t, b)) % 2**63)  # ints: the same in every process
                block = torch.randn(hi - lo, field.embed_dim, generator=gen).mul_(std)
                if lo == 0:
                    block[0] = 0
                a, z = max(lo, rows.start), min(hi, rows.stop)
                dst[a - rows.start:z - rows.start].copy_(block[a - lo:z - lo, cols])


def clone_state(state: Mapping[str, Tensor | ShardedTensor]) -> dict[str, Tensor | ShardedTensor]:
    """A copy of ``state`` (of :func:`state_dict`) that later steps do not change: each rank copies its own
    shards (no communication)."""
    out: dict[str, Tensor | ShardedTensor] = {}
    for name, value in state.items():
        if isinstance(value, ShardedTensor):
            shards = [Shard(s.tensor.detach().clone(), s.metadata) for s in value.local_shards()]
            out[name] = ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, value.metadata(), process_group=value._process_group)
        else:
            out[name] = value.detach().clone()
    return out


def full_state_dict(state: Mapping[str, Tensor | ShardedTensor], dst: int = 0) -> dict[str, Tensor] | None:
    """The whole tensors of ``state`` on rank ``dst`` (a ``DIN``'s ``state_dict``, on the CPU), None on the other
    ranks. Collective: every rank calls it (each sharded table is gathered to ``dst``)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if isinstance(value, ShardedTensor):
            whole = torch.empty(tuple(value.size()), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=whole)
            out[name] = whole
        else:
            out[name] = value.detach().cpu().clone()
    return out if rank == dst else None


def save(state: Mapping, path: str) -> None:
    """``torch.distributed.checkpoint.save`` of ``state`` (nested dicts of tensors, ``ShardedTensor``s and plain
    values) into the folder ``path``: every rank writes its shards. Collective."""
    dcp.save(dict(state), checkpoint_id=path)


def load(state: dict, path: str) -> dict:
    """Reads the folder ``path`` (of :func:`save`, written by any number of ranks) into ``state`` in place
    (resharding as needed) and returns it. Collective."""
    dcp.load(state, checkpoint_id=path)
    return state
