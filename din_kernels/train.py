"""Training and evaluation of DIN / BaseModel: ``python -m din_kernels train|eval|compare|export ...`` (see ``--help``;
``export`` writes a run's ``rank`` as an AOTInductor package, :mod:`din_kernels.serving`).

One process, or several under ``torchrun`` (``DistributedDataParallel``, gloo on the CPU, nccl on GPUs): each step
takes one global batch of ``batch_size * world_size`` samples, every rank its own slice; the MBA counts ``n_j`` are
counted over the whole training split (each rank counts its share, then ``all_reduce``), and the MBA term is added
once per distinct id of the global batch after the gradients are averaged, so ``world_size`` processes with
``batch_size`` follow one process with ``batch_size * world_size`` step for step (up to float rounding). Dice's
batch statistics stay per rank (as ``nn.BatchNorm1d`` without synchronisation). ``--nproc N`` starts the N local
processes itself (through torchrun).

``--engine torchrec`` (the ``torchrec`` extra) shards the embedding tables over the processes with TorchRec
(``--sharding`` row-, table- or column-wise) instead of replicating them, the optimizer fused into the tables'
backward and the dense modules under DDP; it follows the same steps (see :mod:`din_kernels.torchrec.training` for
its checkpoints).

A run writes its folder as :mod:`din_kernels.runs` describes (``model.pt``, ``last.pt``, ``metrics.json``, plots),
every file atomically. The training order of epoch ``e`` is a function of ``(seed, e)`` alone, and ``last.pt``
holds everything else that the next epoch depends on, so ``train --resume`` after a killed run ends with the same
metrics as the uninterrupted run.

This module imports with the core (torch, numpy); training and evaluation need the ``train`` extra (pandas,
scikit-learn, tqdm), plots the ``plots`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _extras, runs
from . import metrics as M
from .backend import BACKENDS, BackendUnavailableError
from .data import DATASETS, SeqData, SyntheticConfig, load_dataset
from .nn.din import DIN, BaseModel
from .ops.mba import mba_l2_


class ConfigError(ValueError):
    """A setting that cannot work; ``field`` names it (its flag is ``--`` and the field with dashes)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")

    def flag_message(self) -> str:
        return f"argument {_flag(self.field)}: {self.reason}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Bound:
    """The range of a numeric setting: a finite ``kind`` (int or float) ``>= low`` (``> low`` when ``above``) and, when
    given, ``<= high``."""

    kind: type
    low: float
    above: bool = False
    high: float | None = None

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.high is not None:
            return f"{what} in [{self.low}, {self.high}]"
        return f"{what} {'>' if self.above else '>='} {self.low}"

    def admits(self, value: Any) -> bool:
        kinds = (int, float) if self.kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        return (value > self.low if self.above else value >= self.low) and (self.high is None or value <= self.high)

    def parse(self, text: str) -> int | float:
        """An argparse ``type``: the value of ``text``, or ``ArgumentTypeError`` naming it."""
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if not self.admits(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value


# TrainConfig's numeric fields (None is also allowed for max_steps: no limit, and threads: torch's default)
BOUNDS: dict[str, Bound] = {
    "mba_lambda": Bound(float, 0), "lr": Bound(float, 0, above=True), "batch_size": Bound(int, 1),
    "epochs": Bound(int, 1), "patience": Bound(int, 0), "max_steps": Bound(int, 1), "eval_batch_size": Bound(int, 1),
    "max_len": Bound(int, 1), "seed": Bound(int, 0, high=2**32 - 1), "threads": Bound(int, 0),
}
SYNTHETIC_USERS = Bound(int, 10)  # every split gets a user
CHOICES: dict[str, tuple] = {
    "model": tuple(runs.MODELS), "dataset": DATASETS, "activation": ("prelu", "dice"),
    "att_activation": (None, "sigmoid", "relu", "prelu", "dice"), "backend": BACKENDS,
    "layout": ("padded", "jagged"), "optimizer": ("adam", "sgd", "adagrad"), "engine": ("torch", "torchrec"),
    "sharding": ("row", "table", "column"),
}
NPROC = Bound(int, 1)
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}
# settings that do not change what a run computes: the ones --resume may change
_RESUMABLE = ("out", "progress", "threads")


@dataclass
class TrainConfig:
    """The settings of one run (one field per flag of ``train``; see ``python -m din_kernels train --help``)."""

    model: str = "din"
    dataset: str = "synthetic"
    data_dir: str | None = None
    out: str = "runs/din"
    activation: str = "prelu"
    att_activation: str | None = None
    mba_lambda: float = 0.0
    backend: str = "auto"
    layout: str = "padded"
    batch_size: int = 256
    lr: float = 5e-3
    optimizer: str = "adam"
    epochs: int = 4
    patience: int = 1
    max_steps: int | None = None
    eval_batch_size: int = 2048
    max_len: int = 50
    seed: int = 0
    threads: int | None = 1
    progress: bool = True
    synthetic: SyntheticConfig | None = field(default=None)
    engine: str = "torch"
    nproc: int = 1
    sharding: str = "row"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the first setting out of its range or choices."""
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if not (value is None and name in ("max_steps", "threads")) and not bound.admits(value):
                raise ConfigError(name, f"must be {bound.describe()}, got {value!r}")
        for name, options in CHOICES.items():
            if getattr(self, name) not in options:
                raise ConfigError(name, f"must be one of {options}, got {getattr(self, name)!r}")
        if self.synthetic is not None and not SYNTHETIC_USERS.admits(self.synthetic.num_users):
            raise ConfigError("synthetic_users", f"must be {SYNTHETIC_USERS.describe()}, "
                                                 f"got {self.synthetic.num_users!r}")
        if not NPROC.admits(self.nproc):
            raise ConfigError("nproc", f"must be {NPROC.describe()}, got {self.nproc!r}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config ``dataclasses.asdict`` gave (as a checkpoint stores it)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("synthetic") is not None:
            kw["synthetic"] = SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in kw["synthetic"].items()})
        return cls(**kw)


def check_engine(config: TrainConfig, world_size: int | None = None) -> None:
    """Raises :class:`ConfigError` for ``nproc`` when the run has another number of processes (``world_size``,
    when given) and for an ``optimizer`` that the torchrec engine cannot fuse on this machine's device, and
    ``ModuleNotFoundError`` naming the ``torchrec`` extra when ``engine`` is ``torchrec`` and it is missing."""
    if world_size is not None and config.nproc > 1 and world_size != config.nproc:
        raise ConfigError("nproc", f"{config.nproc} processes were asked for, this run has {world_size}: "
                                   f"`python -m din_kernels train --nproc {config.nproc}` starts them (or "
                                   f"torchrun --nproc_per_node {config.nproc})")
    if config.engine != "torchrec":
        return
    problem = _extras.missing_message("torchrec", "--engine torchrec")
    if problem:
        raise ModuleNotFoundError(problem)
    from .torchrec.training import unsupported

    reason = unsupported(config.optimizer)
    if reason:
        raise ConfigError("optimizer", reason)


def _launch(nproc: int, argv: list[str]) -> int:
    """``python -m din_kernels ARGV`` in ``nproc`` local processes (torchrun's launcher, a rendezvous on a free
    local port); 0, or the exit status of the first process that failed."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(launch, sys.executable)("-m", "din_kernels", *argv)
    except ChildFailedError as e:
        return max(f.exitcode for f in e.failures.values()) or 1
    return 0


@torch.no_grad()
def predict(model: torch.nn.Module, data: SeqData, split: str, batch_size: int = 2048,
            layout: str = "padded") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uid [S], label [S], logit [S])`` of a split, in eval mode, on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    uids, labels, logits = [], [], []
    for batch in data.iterate(split, batch_size, layout=layout):
        logits.append(model({k: v.to(device) for k, v in batch.items()}).float().cpu().numpy())
        uids.append(batch["uid"].numpy())
        labels.append(batch["label"].numpy())
    model.train(was_training)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    return cat(uids), cat(labels), cat(logits)


def evaluate_split(model: torch.nn.Module, data: SeqData, split: str, config: TrainConfig) -> dict[str, float]:
    """``{auc, gauc, logloss}`` of ``split`` (NaN when it holds one class only)."""
    u, y, s = predict(model, data, split, config.eval_batch_size, config.layout)
    if y.size == 0 or y.min() == y.max():
        return {"auc": float("nan"), "gauc": float("nan"), "logloss": float("nan")}
    return M.evaluate(u, y, s)


def _gather_distinct(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The distinct ids of every rank's ``ids`` together (all_gather with padding to the longest)."""
    local = torch.unique(ids)
    size = torch.tensor([local.numel()], dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), -1, dtype=torch.long)
    padded[:local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    union = torch.unique(torch.cat(parts))
    return union[union >= 0]


def _global_mba_(model: BaseModel, batch: dict, lam: float, world_size: int) -> float:
    """Adds MBA's ``lam * W[j] / n[j]`` to the (already averaged) gradients, once per distinct id of the global
    batch; returns the penalty."""
    penalty = 0.0
    for name, ids in model.schema.lookups(batch).items():
        table = model.tables[name]
        union = _gather_distinct(torch.cat([t.reshape(-1) for t in ids]).long(), world_size)
        if table.weight.grad is None:
            table.weight.grad = torch.zeros_like(table.weight)
        _, p = mba_l2_(table.weight.detach(), table.weight.grad, union, table.counts, lam, padding_idx=0)
        penalty += float(p)
    return penalty


def _save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    runs.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _plot_curves(history: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    loss = np.asarray(history["train_loss"])
    if loss.size:
        window = max(1, loss.size // 50)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax1.plot(np.arange(loss.size), loss, alpha=0.25, label="per step")
        ax1.plot(np.arange(smooth.size) + window - 1, smooth, label=f"mean of {window}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train logloss")
    ax1.legend()
    epochs = np.arange(1, len(history["val"]) + 1)
    for key in ("auc", "gauc"):
        ax2.plot(epochs, [v[key] for v in history["val"]], marker="o", label=f"val {key}")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation")
    ax2.legend()
    fig.tight_layout()
    _save_figure(fig, path)


@torch.no_grad()
def _plot_attention(model: DIN, data: SeqData, path: str, num: int = 6) -> None:
    """Heat map of the target attention weights of clicked test impressions of a few users (one each, with at
    least 5 behaviours); behaviours of the ad's category are circled."""
    import matplotlib.pyplot as plt

    s = data.splits["test"]
    ok = np.flatnonzero((s["label"] > 0) & (np.minimum(s["pos"], data.max_len) >= 5))
    idx = ok[np.sort(np.unique(s["uid"][ok], return_index=True)[1])][:num]  # one impression per user
    if idx.size == 0:
        return
    model.eval()
    batch = data.batch("test", idx, "padded")
    _, w = model(batch, return_scores=True)
    w = w.float().numpy()
    lengths = batch["hist_len"].numpy()
    same_cate = (batch["hist"][..., 1] == batch["ad"][:, None, 1]).numpy()
    masked = np.ma.masked_array(w, mask=np.arange(w.shape[1])[None, :] >= lengths[:, None])
    fig, ax = plt.subplots(figsize=(max(6, w.shape[1] * 0.25), 1 + 0.5 * len(idx)))
    im = ax.imshow(masked, aspect="auto", cmap="viridis")
    rows, cols = np.nonzero(same_cate & ~masked.mask)
    ax.scatter(cols, rows, marker="o", s=12, facecolors="none", edgecolors="red", label="same category as the ad")
    ax.set_yticks(range(len(idx)), [f"user {u}" for u in batch["uid"].numpy()])
    ax.set_xlabel("behaviour (time order)")
    ax.set_title("DIN attention weight of each behaviour for the candidate ad (a clicked test impression per user)",
                 fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save_figure(fig, path)


def _write_plots(model: BaseModel, data: SeqData, history: dict, out: str) -> None:
    """``curves.png`` and (DIN) ``attention.png`` in ``out``; without matplotlib one warning line instead."""
    try:
        import matplotlib
    except ImportError:
        print(f"warning: matplotlib is not installed, so {out} gets no curves.png or attention.png "
              f"({_extras.install_hint('plots')})", file=sys.stderr)
        return
    matplotlib.use("Agg")
    _plot_curves(history, os.path.join(out, "curves.png"))
    if isinstance(model, DIN):
        _plot_attention(model, data, os.path.join(out, "attention.png"))


def _rng_state() -> dict:
    """The torch, numpy and python global RNG states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def _read_state(out: str, mmap: bool = False) -> dict:
    """``out/last.pt``, or a :class:`ConfigError` for ``resume`` when there is none."""
    path = os.path.join(out, runs.STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError("resume", f"there is no {runs.STATE_FILE} in {out!r} to resume from (no epoch of a run "
                                    "there has finished)")
    return runs.read(path, mmap=mmap)


def _resume_state(config: TrainConfig) -> dict:
    """``last.pt`` of ``config.out``, checked to hold a run of the same settings (but those of ``_RESUMABLE``)."""
    state = _read_state(config.out)
    saved = asdict(TrainConfig.from_dict(state["config"]))
    for name, value in asdict(config).items():
        if name not in _RESUMABLE and saved[name] != value:
            raise ConfigError(name, f"the run in {config.out!r} has {saved[name]!r}, this config {value!r}: "
                                    "resume it with its own settings")
    return state


def _model_checkpoint(config: TrainConfig, data: SeqData, state: dict, epoch: int) -> dict:
    return {"format": runs.FORMAT, "config": asdict(config), "schema": asdict(data.schema), "model": state,
            "epoch": epoch}


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Trains, selects the epoch of best validation GAUC, evaluates on test and writes ``config.out``
    (:mod:`din_kernels.runs`): ``model.pt`` (the selected state), ``last.pt`` (after every epoch), ``metrics.json``,
    ``curves.png``, ``attention.png`` (DIN, with matplotlib). With ``resume``, continues the run in ``config.out``
    from its ``last.pt`` (same settings but ``out``, ``progress``, ``threads``). Returns the metrics.

    Raises :class:`ConfigError` for settings that cannot work, a run that would make no optimisation step among
    them, and ``ModuleNotFoundError`` naming the extra to install when a package of the ``train`` extra is missing,
    both before any training."""
    config.validate()
    problem = _extras.missing_message("train", "din_kernels.train.train")
    if problem:
        raise ModuleNotFoundError(problem)
    from tqdm.auto import tqdm

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_engine(config, world_size)
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    if config.threads:
        torch.set_num_threads(config.threads)
    saved = _resume_state(config) if resume else None
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)

    t0 = time.perf_counter()
    data = load_dataset(config.dataset, config.data_dir, config.seed, config.max_len, config.synthetic)
    load_s = time.perf_counter() - t0
    steps_per_epoch = data.num_batches("train", config.batch_size, world_size, drop_last=True)
    if steps_per_epoch == 0:
        raise ConfigError("batch_size", f"{config.batch_size} (x {world_size} process(es)) is more than the "
                                        f"{data.num_samples('train')} training samples of {config.dataset!r}: no "
                                        "optimisation step would be made")
    model = runs.build_model(asdict(config), data.schema)
    if config.mba_lambda:
        counts = data.table_counts("train", rank, world_size)
        if distributed:
            for c in counts.values():
                dist.all_reduce(c)
        model.set_mba(0.0 if distributed else config.mba_lambda, counts)
    engine = None
    if config.engine == "torchrec":  # the tables (and their MBA counts) move into TorchRec's sharded tables
        from .torchrec import training as _torchrec

        engine = _torchrec.build(model, config)
        model, net, opt = engine.model, engine.net, engine.optimizer
    else:
        opt = OPTIMIZERS[config.optimizer](model.parameters(), lr=config.lr)
    # everything the next epoch depends on but the model, the optimizer and the RNGs (saved in last.pt)
    loop: dict[str, Any] = {"epoch": 0, "step": 0, "seen": 0, "train_s": 0.0, "best": -math.inf, "bad": 0,
                            "best_epoch": 0, "done": False,
                            "history": {"train_loss": [], "val": [], "epoch_s": [], "mba_penalty": []}}
    best_state = None
    if saved is not None:
        if engine is not None:
            best_state = engine.load(config.out, saved["sharded"])
        else:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            best_state = saved["best_state"]
        loop = {k: saved[k] for k in loop}
        _set_rng_state(saved["rng"])
    if engine is None:
        net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    else:
        engine.remove_stale(config.out, saved["sharded"] if saved is not None else None)
    if rank == 0:
        runs.remove_temporaries(config.out)
    history = loop["history"]

    for epoch in range(loop["epoch"], config.epochs):
        if loop["done"]:
            break
        model.train()
        batches = data.iterate("train", config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch, rank=rank,
                               world_size=world_size, drop_last=True, layout=config.layout)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{config.model} epoch {epoch + 1}", unit="batch",
                   disable=not config.progress or rank != 0, mininterval=1.0)
        t_epoch = time.perf_counter()
        epoch_seen = 0
        for batch in bar:
            if engine is not None:
                batch = engine.to_device(batch)
            loss = F.binary_cross_entropy_with_logits(net(batch), batch["label"])
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if config.mba_lambda:
                penalty = (_global_mba_(model, batch, config.mba_lambda, world_size) if distributed and engine is None
                           else float(model.mba_penalty()))
                history["mba_penalty"].append(penalty)
            opt.step()
            loop["step"] += 1
            epoch_seen += batch["label"].shape[0] * world_size
            history["train_loss"].append(float(loss.detach()))
            if rank == 0 and loop["step"] % 20 == 0:
                rate = epoch_seen / (time.perf_counter() - t_epoch)
                bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}", samples_per_s=f"{rate:,.0f}")
            if config.max_steps is not None and loop["step"] >= config.max_steps:
                break
        elapsed = time.perf_counter() - t_epoch
        loop["train_s"] += elapsed
        loop["seen"] += epoch_seen
        history["epoch_s"].append(elapsed)
        val = evaluate_split(model, data, "val", config)
        history["val"].append(val)
        if rank == 0:
            tqdm.write(f"{config.model} epoch {epoch + 1}: {elapsed:.1f}s, {epoch_seen / elapsed:,.0f} samples/s, "
                       f"val auc {val['auc']:.4f} gauc {val['gauc']:.4f} logloss {val['logloss']:.4f}")
        loop["epoch"] = epoch + 1
        score = val["gauc"] if not math.isnan(val["gauc"]) else val["auc"]
        improved = best_state is None or score > loop["best"]
        if improved:
            loop["best"], loop["bad"], loop["best_epoch"] = score, 0, epoch + 1
            best_state = (engine.snapshot() if engine is not None
                          else {k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            loop["bad"] += 1
        loop["done"] = (loop["bad"] > config.patience
                        or (config.max_steps is not None and loop["step"] >= config.max_steps))
        if engine is not None:  # collective: every rank writes its shards, rank 0 gathers the selected model
            state = {"sharded": engine.save(config.out, epoch + 1, best_state)}
            selected = engine.full_state(best_state) if improved else None
        else:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "best_state": best_state}
            selected = best_state
        if rank == 0:
            if improved:
                runs.save(_model_checkpoint(config, data, selected, epoch + 1),
                          os.path.join(config.out, runs.MODEL_FILE))
            runs.save({"format": runs.FORMAT, "config": asdict(config), **loop, **state, "rng": _rng_state()},
                      os.path.join(config.out, runs.STATE_FILE))
        if engine is not None:
            engine.remove_stale(config.out, state["sharded"])

    best_epoch = loop["best_epoch"]
    if engine is not None:
        engine.restore(best_state)
        best_state = engine.full_state(best_state)  # the whole model on rank 0 (collective)
    else:
        model.load_state_dict(best_state)
    test = evaluate_split(model, data, "test", config)
    results = {
        "model": config.model, "dataset": config.dataset, "activation": config.activation,
        "mba_lambda": config.mba_lambda, "backend": config.backend, "world_size": world_size,
        "test_auc": test["auc"], "test_gauc": test["gauc"], "test_logloss": test["logloss"],
        "val_auc": history["val"][best_epoch - 1]["auc"], "val_gauc": history["val"][best_epoch - 1]["gauc"],
        "best_epoch": best_epoch, "epochs_run": len(history["val"]), "steps": loop["step"],
        "samples_per_s": loop["seen"] / loop["train_s"] if loop["train_s"] else float("nan"),
        "time_per_epoch_s": float(np.mean(history["epoch_s"])), "load_s": load_s,
        "train_samples": data.num_samples("train"), "history": history,
    }
    if rank == 0:
        runs.save(_model_checkpoint(config, data, best_state, best_epoch), os.path.join(config.out, runs.MODEL_FILE))
        runs.save_json(results, os.path.join(config.out, runs.METRICS_FILE))
        tqdm.write(f"{config.model} test auc {test['auc']:.4f} gauc {test['gauc']:.4f} "
                   f"logloss {test['logloss']:.4f} -> {config.out}")
        if engine is not None:  # the plots from the whole model, on this process alone
            model = runs.build_model(asdict(config), data.schema)
            model.load_state_dict(best_state)
        _write_plots(model, data, history, config.out)
    if distributed:
        dist.barrier()
    if engine is not None:
        engine.close()
    return results


def evaluate_run(run_dir: str, dataset: str | None = None, data_dir: str | None = None, split: str = "test",
                 batch_size: int | None = None, layout: str | None = None, device: torch.device | str | None = None,
                 backend: str | None = None) -> dict:
    """Scores the model a run saved (:func:`din_kernels.load_run`) on ``split`` of ``dataset`` (default: the run's,
    built with the run's seed, ``max_len`` and synthetic settings): ``{run, dataset, split, samples, auc, gauc,
    logloss}``. The dataset's schema must be the run's."""
    problem = _extras.missing_message("train", "din_kernels.train.evaluate_run")
    if problem:
        raise ModuleNotFoundError(problem)
    run = runs.load_run(run_dir, device, backend)
    config = TrainConfig.from_dict(run.config)
    dataset = dataset or config.dataset
    same = dataset == config.dataset
    data = load_dataset(dataset, data_dir or (config.data_dir if same else None), config.seed, config.max_len,
                        config.synthetic if same else None)
    if data.schema != run.schema:
        raise ConfigError("dataset", f"{dataset!r} does not have the fields of the run in {run_dir!r}: the run has "
                                     f"{run.schema}, the data {data.schema}")
    config = replace(config, eval_batch_size=batch_size or config.eval_batch_size, layout=layout or config.layout)
    scores = evaluate_split(run.model, data, split, config)
    return {"run": run_dir, "dataset": dataset, "split": split, "samples": data.num_samples(split), **scores}


def compare_table(runs: list[dict]) -> str:
    """A table of test metrics with RelaImpr (eq. 11) of each run against the first (the base)."""
    base = runs[0]
    lines = [f"{'model':<8} {'test AUC':>9} {'test GAUC':>10} {'logloss':>8} {'RelaImpr(AUC)':>14} "
             f"{'RelaImpr(GAUC)':>15} {'s/epoch':>8} {'samples/s':>10}"]
    for r in runs:
        lines.append(f"{r['model']:<8} {r['test_auc']:>9.4f} {r['test_gauc']:>10.4f} {r['test_logloss']:>8.4f} "
                     f"{100 * M.rela_impr(r['test_auc'], base['test_auc']):>13.2f}% "
                     f"{100 * M.rela_impr(r['test_gauc'], base['test_gauc']):>14.2f}% "
                     f"{r['time_per_epoch_s']:>8.1f} {r['samples_per_s']:>10,.0f}")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options whose default is a value (not None, not a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _train_arguments(t: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The flags of ``train``; ``defaults=False`` leaves unset flags out of the parsed namespace (to tell which were
    given)."""
    d, s = TrainConfig(), SyntheticConfig()

    def add(flag: str, default: Any = None, **kw: Any) -> None:
        t.add_argument(flag, default=default if defaults else argparse.SUPPRESS, **kw)

    def number(flag: str, field: str, default: Any, help: str, metavar: str = "N", unset: str = "") -> None:
        add(flag, default, type=BOUNDS[field].parse, metavar=metavar,
            help=f"{help}; {BOUNDS[field].describe()}" + (f" (default: {unset})" if unset else ""))

    add("--model", d.model, choices=CHOICES["model"], help="DIN or the Embedding&MLP base model")
    add("--dataset", d.dataset, choices=DATASETS, help="the data set")
    add("--data-dir", None, metavar="DIR", help="folder of the raw files (amazon, movielens)")
    add("--out", None, required=True, metavar="DIR", help="the run's folder (model.pt, last.pt, metrics.json, plots)")
    add("--activation", d.activation, choices=CHOICES["activation"], help="the MLP's activation")
    add("--att-activation", None, choices=CHOICES["att_activation"][1:],
        help="the attention MLP's activation (default: --activation)")
    number("--mba-lambda", "mba_lambda", d.mba_lambda, "MBA L2 strength (0: off)", "X")
    add("--backend", d.backend, choices=BACKENDS, help="backend of every op of the model")
    add("--layout", d.layout, choices=CHOICES["layout"], help="behaviour batches padded or jagged")
    number("--batch-size", "batch_size", d.batch_size, "training batch per process")
    number("--eval-batch-size", "eval_batch_size", d.eval_batch_size, "evaluation batch")
    number("--lr", "lr", d.lr, "learning rate", "X")
    add("--optimizer", d.optimizer, choices=CHOICES["optimizer"], help="the optimiser")
    number("--epochs", "epochs", d.epochs, "epochs at most")
    number("--patience", "patience", d.patience, "epochs without a better val GAUC to wait before stopping")
    number("--max-steps", "max_steps", None, "stop after this many optimisation steps", unset="no limit")
    number("--max-len", "max_len", d.max_len, "most recent behaviours kept")
    number("--seed", "seed", d.seed, "seed of the initial parameters, the data order and the synthetic data")
    number("--threads", "threads", d.threads,
           "intra-op threads per process (0: torch's default); 1 avoids contention on a small CPU")
    add("--synthetic-users", s.num_users, type=SYNTHETIC_USERS.parse, metavar="N",
        help=f"users of the synthetic data; {SYNTHETIC_USERS.describe()}")
    add("--engine", None, choices=CHOICES["engine"],
        help=f"where the embedding tables live: torch (whole on every process, DDP with several) or torchrec "
             f"(sharded over the processes by TorchRec: {_extras.install_hint('torchrec')}); {d.engine} when not "
             "given")
    add("--nproc", None, type=NPROC.parse, metavar="N",
        help=f"local processes to train with (started through torchrun: gloo on the CPU, nccl on GPUs); "
             f"{NPROC.describe()}, {d.nproc} when not given")
    add("--sharding", None, choices=CHOICES["sharding"],
        help=f"how --engine torchrec splits each table over the processes: by rows, whole tables, or columns; "
             f"{d.sharding} when not given")
    add("--no-progress", False, action="store_true", help="no progress bar")
    add("--resume", False, action="store_true",
        help="continue the run in --out from its last finished epoch (last.pt), with the run's own settings")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m din_kernels", description="DIN / BaseModel training and evaluation "
                                f"(needs the train extra: {_extras.install_hint('train')})")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and evaluate a model", formatter_class=_HelpFormatter,
                       description="Train, select the epoch of best validation GAUC, evaluate on test.")
    _train_arguments(t)
    e = sub.add_parser("eval", help="score a saved run on a split", formatter_class=_HelpFormatter,
                       description="Score a saved run's model.pt on a split; prints one JSON line.")
    e.add_argument("--run", required=True, metavar="DIR", help="the run's folder (or its model.pt)")
    e.add_argument("--dataset", choices=DATASETS, default=None, help="the data set (default: the run's)")
    e.add_argument("--data-dir", default=None, metavar="DIR", help="folder of the raw files (default: the run's)")
    e.add_argument("--split", choices=("train", "val", "test"), default="test", help="the split to score")
    e.add_argument("--batch-size", type=BOUNDS["eval_batch_size"].parse, default=None, metavar="N",
                   help="evaluation batch (default: the run's --eval-batch-size)")
    e.add_argument("--layout", choices=CHOICES["layout"], default=None, help="batch layout (default: the run's)")
    e.add_argument("--device", default="cpu", help="torch device to score on")
    e.add_argument("--backend", choices=BACKENDS, default=None, help="backend of every op (default: the run's)")
    c = sub.add_parser("compare", help="print test metrics of finished runs with RelaImpr against the first")
    c.add_argument("runs", nargs="+", help="output folders; the first is the base")
    x = sub.add_parser(
        "export", help="write a run's model.rank as an AOTInductor package (.pt2)", formatter_class=_HelpFormatter,
        description="Export the model.pt of a run as an AOTInductor package of model.rank(batch, candidates, "
                    "candidate_offsets) in eval mode, the numbers of users, candidates and behaviours dynamic "
                    "(din_kernels.export; load it with din_kernels.load or, in C++, examples/rank). The example "
                    "batch is built from the run's schema (random ids). Prints one JSON line.")
    x.add_argument("--run", required=True, metavar="DIR", help="the run's folder (or its model.pt)")
    x.add_argument("--out", required=True, metavar="FILE.pt2", help="the package to write")
    x.add_argument("--layout", choices=CHOICES["layout"], default=None,
                   help="the batches the package takes, padded or jagged (default: the run's)")
    x.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="backend of the model's ops in the package: auto takes the compiled cpu kernels where the "
                        "extension is built; torch is compiled from aten ops; every backend computes the same "
                        "function")
    x.add_argument("--device", default="cpu", help="torch device the package runs on")
    return p


def export_run(run_dir: str, out: str, layout: str | None = None, backend: str = "auto",
               device: torch.device | str = "cpu") -> dict:
    """``python -m din_kernels export``: the run's model (:func:`din_kernels.load_run`) exported to ``out``
    (:func:`din_kernels.export`, an example batch of random ids from its schema); returns what it prints."""
    from . import serving

    run = runs.load_run(run_dir, device, backend)
    layout = layout or run.config.get("layout", "padded")
    batch, candidates, offsets = serving.random_batch(serving.input_vocab(run.model, layout), layout, device=device)
    start = time.perf_counter()
    path = serving.export(run.model, batch, out, candidates, offsets)
    package = serving.load(path)
    return {"package": path, "run": run.path, "epoch": run.epoch, "layout": layout, "inputs": package.input_names,
            "compiled_ops": [op for op in package.metadata[serving.META_OPS].split(",") if op],
            "export_s": round(time.perf_counter() - start, 1)}


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, out=args.out, activation=args.activation,
        att_activation=args.att_activation, mba_lambda=args.mba_lambda, backend=args.backend, layout=args.layout,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr, optimizer=args.optimizer,
        epochs=args.epochs, patience=args.patience, max_steps=args.max_steps, max_len=args.max_len, seed=args.seed,
        threads=args.threads or None, progress=not args.no_progress,
        synthetic=SyntheticConfig(num_users=args.synthetic_users, seed=args.seed) if args.dataset == "synthetic"
        else None, engine=args.engine or TrainConfig.engine, nproc=args.nproc or TrainConfig.nproc,
        sharding=args.sharding or TrainConfig.sharding,
    )


def _resumed_config(args: argparse.Namespace, argv: list[str]) -> TrainConfig:
    """The saved run's config with ``out``, ``progress`` and ``threads`` from the command line; a flag given that
    would change what the run computes is a :class:`ConfigError` naming it."""
    saved = TrainConfig.from_dict(_read_state(args.out, mmap=True)["config"])
    given_parser = argparse.ArgumentParser(add_help=False)
    _train_arguments(given_parser, defaults=False)
    given = vars(given_parser.parse_known_args(argv[argv.index("train") + 1:])[0])
    asked = _config_from_args(args)
    for dest, value in given.items():
        if dest in ("out", "threads", "no_progress", "resume"):
            continue
        if dest == "synthetic_users":
            before = saved.synthetic.num_users if saved.synthetic is not None else None
        else:
            before, value = getattr(saved, dest), getattr(asked, dest)
        if value != before:
            raise ConfigError(dest, f"{value!r} differs from the run's {before!r} in {args.out!r}: --resume "
                                    "continues a run with its own settings (leave the flag out)")
    return replace(saved, out=args.out, progress=asked.progress,
                   threads=asked.threads if "threads" in given else saved.threads)


def main(argv: list[str] | None = None) -> int:
    """``python -m din_kernels``: returns the exit status (2 for bad flags and missing packages)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        results = []
        for folder in args.runs:
            with open(os.path.join(folder, runs.METRICS_FILE)) as f:
                results.append(json.load(f))
        print(compare_table(results))
        return 0
    if args.command == "export":  # the core only: no train extra
        try:
            print(json.dumps(export_run(args.run, args.out, args.layout, args.backend, args.device)))
        except (OSError, ValueError, TypeError, BackendUnavailableError) as e:  # no run, a bad setting or backend
            print(f"{parser.prog} export: error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0
    problem = _extras.missing_message("train", "this command")
    if problem:
        print(f"{parser.prog} {args.command}: error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.command == "eval":
            print(json.dumps(evaluate_run(args.run, args.dataset, args.data_dir, args.split, args.batch_size,
                                          args.layout, args.device, args.backend)))
            return 0
        config = _resumed_config(args, argv) if args.resume else _config_from_args(args)
        problem = _extras.missing_message("torchrec", "--engine torchrec") if config.engine == "torchrec" else None
        if problem:
            print(f"{parser.prog} {args.command}: error: {problem}", file=sys.stderr)
            return 2
        if config.nproc > 1 and "WORLD_SIZE" not in os.environ:
            check_engine(config)
            return _launch(config.nproc, argv)
        train(config, resume=args.resume)
    except ConfigError as e:
        print(f"{parser.prog} {args.command}: error: {e.flag_message()}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
