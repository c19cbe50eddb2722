"""A training run on disk: the files ``python -m din_kernels train --out RUN_DIR`` writes, and loading them back.

``RUN_DIR/``

- ``model.pt``: the selected model (the epoch of best validation GAUC so far), ``{"format", "config", "schema",
  "model", "epoch"}``: the run's settings (a :class:`din_kernels.train.TrainConfig` as a dict), the
  :class:`~din_kernels.nn.din.FeatureSchema` as a dict, the ``state_dict`` and the epoch it is from. Written after
  every epoch that improves on the best, so a run stopped early still leaves one.
- ``last.pt``: the training state after the last finished epoch, which ``train --resume`` continues from (the model,
  the optimizer, the torch/numpy/python RNG states, the epoch and step counters, early stopping's state and the
  history of metrics).
- ``metrics.json``: the finished run's metrics; ``curves.png`` and ``attention.png`` when matplotlib is installed.

Every file is written to a temporary file in the same folder, flushed to disk, then renamed over the old one
(``os.replace``): a process killed mid-write leaves the previous file whole, never a truncated one. The checkpoints
hold tensors and plain Python values only, so ``torch.load(path, weights_only=True)`` reads them.

Loading needs the core only (torch, numpy)::

    run = din_kernels.load_run("runs/din", device="cpu")   # run.model in eval mode, run.schema, run.metrics
    logits = run.model(batch)                               # [B]; batch as din_kernels.data.SeqData.batch builds it
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

from .nn.din import DIN, BaseModel, FeatureSchema

MODEL_FILE, STATE_FILE, METRICS_FILE = "model.pt", "last.pt", "metrics.json"
FORMAT = 1
MODELS: dict[str, type[BaseModel]] = {"din": DIN, "base": BaseModel}


def write_atomic(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, flushes it to disk and renames it to ``path``; on any
    failure (KeyboardInterrupt included) the temporary file is removed and ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:  # a new file, with the permissions of the umask (unlike mkstemp's 0600)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str) -> None:
    """``obj`` as indented JSON in ``path``, atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def remove_temporaries(run_dir: str) -> None:
    """Removes the temporary files that a process killed mid-write left in ``run_dir``."""
    for name in (MODEL_FILE, STATE_FILE, METRICS_FILE):
        for tmp in glob.glob(os.path.join(glob.escape(run_dir), f".{name}.*.tmp")):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def build_model(config: Mapping[str, Any], schema: FeatureSchema) -> BaseModel:
    """The (untrained) model that a run's settings describe: ``config["model"]`` (``din`` | ``base``),
    ``activation``, ``att_activation`` (DIN), ``mba_lambda`` and ``backend``."""
    kind = config["model"]
    if kind not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {kind!r}")
    kwargs = dict(activation=config["activation"], mba_lambda=config["mba_lambda"], backend=config["backend"])
    if kind == "din":
        kwargs["att_activation"] = config["att_activation"]
    return MODELS[kind](schema, **kwargs)


def read(path: str, mmap: bool = False) -> dict:
    """A checkpoint (``model.pt`` or ``last.pt``) as a dict, its tensors on the CPU (memory-mapped with ``mmap``:
    read from disk when used)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def model_from_checkpoint(checkpoint: Mapping[str, Any], device: torch.device | str | None = None,
                          backend: str | None = None) -> BaseModel:
    """The model of a ``model.pt`` dict (:func:`read`), its state loaded, in eval mode on ``device``."""
    config = dict(checkpoint["config"])
    if backend is not None:
        config["backend"] = backend
    model = build_model(config, FeatureSchema.from_dict(checkpoint["schema"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device or "cpu").eval()


def _model_path(path: str) -> str:
    return os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path


def load_model(path: str, device: torch.device | str | None = None, backend: str | None = None) -> BaseModel:
    """The model saved in ``path`` (a run's folder or its ``model.pt``), in eval mode on ``device``."""
    return model_from_checkpoint(read(_model_path(path)), device, backend)


@dataclass
class Run:
    """A run loaded back: ``model`` (eval mode), its ``config`` (the run's settings as a dict), the ``epoch`` the model
    is from and ``metrics`` (``metrics.json``; None while the run has not finished)."""

    path: str
    model: BaseModel
    config: dict
    epoch: int
    metrics: dict | None

    @property
    def schema(self) -> FeatureSchema:
        return self.model.schema


def load_run(run_dir: str, device: torch.device | str | None = None, backend: str | None = None) -> Run:
    """The run that ``python -m din_kernels train --out run_dir`` wrote (finished or not): the schema and the model
    rebuilt from ``model.pt`` and loaded, in eval mode on ``device`` (default: the CPU); ``backend`` replaces the
    run's own (e.g. ``"auto"`` for a run trained with ``"triton"``)."""
    checkpoint = read(_model_path(run_dir))
    folder = run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir)
    metrics = None
    if os.path.isfile(os.path.join(folder, METRICS_FILE)):
        with open(os.path.join(folder, METRICS_FILE)) as f:
            metrics = json.load(f)
    return Run(folder, model_from_checkpoint(checkpoint, device, backend), dict(checkpoint["config"]),
               int(checkpoint.get("epoch", 0)), metrics)
