"""The ``torchrec`` engine of ``python -m din_kernels train --engine torchrec``: the model's tables sharded over the
ranks (:func:`~din_kernels.torchrec.shard`), the optimizer fused into their backward, the dense modules under DDP.

The run's folder holds what the ``torch`` engine writes (``model.pt`` whole, gathered on rank 0, so ``load_run``,
``eval`` and ``compare`` read it unchanged; ``metrics.json``; the plots) and the sharded state of the last finished
epoch, ``last.e<epoch>.dcp/`` (``torch.distributed.checkpoint``: the model, the optimizers' state and the selected
model so far, every rank writing its shards), which ``last.pt`` names (``"sharded"``) and ``train --resume`` loads.
The folder of an epoch is written before the ``last.pt`` that names it, and the older ones are removed after, so a
run killed at any point resumes from a whole state.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..nn.din import BaseModel
from .model import TorchRecModel
from .sharding import CPU_FUSED, default_device, dense_optimizer, shard
from .state import clone_state, full_state_dict, load, load_state_dict_, save, state_dict

SHARDED_GLOB = "last.e*.dcp"


def unsupported(optimizer: str) -> str | None:
    """Why ``optimizer`` cannot train the tables on this machine's device, or None."""
    if default_device().type == "cpu" and optimizer not in CPU_FUSED:
        return (f"fbgemm's CPU embedding kernels have no fused {optimizer} for the tables of --engine torchrec "
                f"(they have {', '.join(CPU_FUSED)}): use --optimizer {' or '.join(CPU_FUSED)}, or GPUs")
    return None


class Engine:
    """One rank of a sharded training run.

    Args:
        model: the model as the ``torch`` engine builds it (its tables' weights and MBA counts become the shards').
        sharding, optimizer, lr, mba_lambda: the run's settings.
    Attributes:
        model (the :class:`TorchRecModel`, for evaluation: every rank calls it), net (the
        ``DistributedModelParallel``, for training), optimizer (the dense and the fused optimizers in one), device.
    """

    def __init__(self, model: BaseModel, sharding: str, optimizer: str, lr: float, mba_lambda: float) -> None:
        self._own_group = not dist.is_initialized()
        if self._own_group:  # one process: a group of one, for DistributedModelParallel
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.device = default_device()
        self.model = TorchRecModel(model)
        self.model.set_mba(mba_lambda)
        self.net = shard(self.model, sharding, optimizer, lr, self.device)
        self.optimizer = dense_optimizer(self.net, optimizer, lr)
        self.rank = dist.get_rank()

    def to_device(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def penalty(self) -> float:
        return float(self.model.mba_penalty())

    def snapshot(self) -> dict:
        """A copy of the model's state (each rank its shards), for the selected epoch."""
        return clone_state(state_dict(self.model))

    def restore(self, snapshot: Mapping) -> None:
        load_state_dict_(self.model, snapshot)

    def full_state(self, snapshot: Mapping) -> dict | None:
        """The whole state of ``snapshot`` on rank 0 (a ``DIN``'s ``state_dict``), None elsewhere. Collective."""
        return full_state_dict(snapshot)

    def save(self, out: str, epoch: int, best: Mapping) -> str:
        """Writes ``out/last.e<epoch>.dcp`` (the model, the optimizer, ``best``) and returns its name. Collective."""
        name = f"last.e{epoch}.dcp"
        path = os.path.join(out, name)
        if self.rank == 0 and os.path.exists(path):  # a partial one of a killed run
            shutil.rmtree(path)
        dist.barrier()
        save({"model": state_dict(self.model), "optimizer": self.optimizer.state_dict(), "best": dict(best)}, path)
        return name

    def load(self, out: str, name: str) -> dict:
        """Loads ``out/<name>`` (of :meth:`save`) into the model and the optimizer; returns the selected state."""
        state: dict[str, Any] = {"model": state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                                 "best": self.snapshot()}
        load(state, os.path.join(out, name))
        load_state_dict_(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["best"]

    def remove_stale(self, out: str, keep: str | None) -> None:
        """Removes the sharded states of ``out`` but ``keep`` (rank 0)."""
        if self.rank != 0:
            return
        for path in glob.glob(os.path.join(glob.escape(out), SHARDED_GLOB)):
            if os.path.basename(path) != keep:
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Ends the group of one that a single process made."""
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()


def build(model: BaseModel, config: Any) -> Engine:
    """The engine of a :class:`din_kernels.train.TrainConfig`."""
    return Engine(model, config.sharding, config.optimizer, config.lr, config.mba_lambda)

