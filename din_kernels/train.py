"""Training and evaluation of DIN / BaseModel: ``python -m din_kernels train ...`` (see ``--help``).

One process, or several under ``torchrun`` (``DistributedDataParallel``, gloo on the CPU, nccl on GPUs): each step
takes one global batch of ``batch_size * world_size`` samples, every rank its own slice; the MBA counts ``n_j`` are
counted over the whole training split (each rank counts its share, then ``all_reduce``), and the MBA term is added
once per distinct id of the global batch after the gradients are averaged, so ``world_size`` processes with
``batch_size`` follow one process with ``batch_size * world_size`` step for step (up to float rounding). Dice's
batch statistics stay per rank (as ``nn.BatchNorm1d`` without synchronisation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics as M
from .data import DATASETS, SeqData, SyntheticConfig, load_dataset
from .nn.din import DIN, BaseModel
from .ops.mba import mba_l2_


@dataclass
class TrainConfig:
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


def build_model(config: TrainConfig, data: SeqData) -> BaseModel:
    kwargs = dict(activation=config.activation, mba_lambda=config.mba_lambda, backend=config.backend)
    if config.model == "din":
        return DIN(data.schema, att_activation=config.att_activation, **kwargs)
    if config.model == "base":
        return BaseModel(data.schema, **kwargs)
    raise ValueError(f"model must be 'din' or 'base', got {config.model!r}")


@torch.no_grad()
def predict(model: torch.nn.Module, data: SeqData, split: str, batch_size: int = 2048,
            layout: str = "padded") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uid [S], label [S], logit [S])`` of a split, in eval mode."""
    was_training = model.training
    model.eval()
    uids, labels, logits = [], [], []
    for batch in data.iterate(split, batch_size, layout=layout):
        logits.append(model(batch).float().cpu().numpy())
        uids.append(batch["uid"].numpy())
        labels.append(batch["label"].numpy())
    model.train(was_training)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    return cat(uids), cat(labels), cat(logits)


def evaluate_split(model, data: SeqData, split: str, config: TrainConfig) -> dict[str, float]:
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


def _plot_curves(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def _plot_attention(model: DIN, data: SeqData, path: str, num: int = 6) -> None:
    """Heat map of the target attention weights of clicked test impressions of a few users (one each, with at
    least 5 behaviours); behaviours of the ad's category are circled."""
    import matplotlib

    matplotlib.use("Agg")
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: TrainConfig) -> dict:
    """Trains, selects the epoch of best validation GAUC, evaluates on test and writes ``config.out``:
    ``metrics.json``, ``model.pt`` (the selected state), ``curves.png``, ``attention.png`` (DIN). Returns the
    metrics."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    t0 = time.perf_counter()
    data = load_dataset(config.dataset, config.data_dir, config.seed, config.max_len, config.synthetic)
    load_s = time.perf_counter() - t0
    model = build_model(config, data)
    if config.mba_lambda:
        counts = data.table_counts("train", rank, world_size)
        if distributed:
            for c in counts.values():
                dist.all_reduce(c)
        model.set_mba(0.0 if distributed else config.mba_lambda, counts)
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    if config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")

    history: dict = {"train_loss": [], "val": [], "epoch_s": [], "mba_penalty": []}
    best, best_state, bad, step, seen, train_s = -math.inf, None, 0, 0, 0, 0.0
    steps_per_epoch = data.num_batches("train", config.batch_size, world_size, drop_last=True)
    for epoch in range(config.epochs):
        model.train()
        batches = data.iterate("train", config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch, rank=rank,
                               world_size=world_size, drop_last=True, layout=config.layout)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{config.model} epoch {epoch + 1}", unit="batch",
                   disable=not config.progress or rank != 0, mininterval=1.0)
        t_epoch = time.perf_counter()
        epoch_seen = 0
        for batch in bar:
            loss = F.binary_cross_entropy_with_logits(net(batch), batch["label"])
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if config.mba_lambda:
                penalty = (_global_mba_(model, batch, config.mba_lambda, world_size) if distributed
                           else float(model.mba_penalty()))
                history["mba_penalty"].append(penalty)
            opt.step()
            step += 1
            epoch_seen += batch["label"].shape[0] * world_size
            history["train_loss"].append(float(loss.detach()))
            if rank == 0 and step % 20 == 0:
                rate = epoch_seen / (time.perf_counter() - t_epoch)
                bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}", samples_per_s=f"{rate:,.0f}")
            if config.max_steps is not None and step >= config.max_steps:
                break
        elapsed = time.perf_counter() - t_epoch
        train_s += elapsed
        seen += epoch_seen
        history["epoch_s"].append(elapsed)
        val = evaluate_split(model, data, "val", config)
        history["val"].append(val)
        if rank == 0:
            tqdm.write(f"{config.model} epoch {epoch + 1}: {elapsed:.1f}s, {epoch_seen / elapsed:,.0f} samples/s, "
                       f"val auc {val['auc']:.4f} gauc {val['gauc']:.4f} logloss {val['logloss']:.4f}")
        score = val["gauc"] if not math.isnan(val["gauc"]) else val["auc"]
        if best_state is None or score > best:
            best, bad = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_epoch = epoch + 1
        else:
            bad += 1
            if bad > config.patience:
                break
        if config.max_steps is not None and step >= config.max_steps:
            break

    model.load_state_dict(best_state)
    test = evaluate_split(model, data, "test", config)
    results = {
        "model": config.model, "dataset": config.dataset, "activation": config.activation,
        "mba_lambda": config.mba_lambda, "backend": config.backend, "world_size": world_size,
        "test_auc": test["auc"], "test_gauc": test["gauc"], "test_logloss": test["logloss"],
        "val_auc": history["val"][best_epoch - 1]["auc"], "val_gauc": history["val"][best_epoch - 1]["gauc"],
        "best_epoch": best_epoch, "epochs_run": len(history["val"]), "steps": step,
        "samples_per_s": seen / train_s if train_s else float("nan"),
        "time_per_epoch_s": float(np.mean(history["epoch_s"])), "load_s": load_s,
        "train_samples": data.num_samples("train"), "history": history,
    }
    if rank == 0:
        os.makedirs(config.out, exist_ok=True)
        with open(os.path.join(config.out, "metrics.json"), "w") as f:
            json.dump(results, f, indent=1)
        cfg = asdict(config)
        torch.save({"model": best_state, "config": cfg, "schema": asdict(data.schema)},
                   os.path.join(config.out, "model.pt"))
        _plot_curves(history, os.path.join(config.out, "curves.png"))
        if isinstance(model, DIN):
            _plot_attention(model, data, os.path.join(config.out, "attention.png"))
        tqdm.write(f"{config.model} test auc {test['auc']:.4f} gauc {test['gauc']:.4f} "
                   f"logloss {test['logloss']:.4f} -> {config.out}")
    if distributed:
        dist.barrier()
    return results


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m din_kernels", description="DIN / BaseModel training")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and evaluate a model")
    d = TrainConfig()
    t.add_argument("--model", choices=("din", "base"), default=d.model)
    t.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    t.add_argument("--data-dir", default=None, help="folder of the raw files (amazon, movielens)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--activation", choices=("prelu", "dice"), default=d.activation, help="the MLP's activation")
    t.add_argument("--att-activation", choices=("sigmoid", "relu", "prelu", "dice"), default=None,
                   help="the attention MLP's activation (default: --activation)")
    t.add_argument("--mba-lambda", type=float, default=d.mba_lambda, help="MBA L2 strength (0: off)")
    t.add_argument("--backend", default=d.backend, help="backend of every op of the model")
    t.add_argument("--layout", choices=("padded", "jagged"), default=d.layout)
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--optimizer", choices=("adam", "sgd"), default=d.optimizer)
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--patience", type=int, default=d.patience, help="epochs without a better val GAUC to wait")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--max-len", type=int, default=d.max_len, help="most recent behaviours kept")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--threads", type=int, default=d.threads,
                   help="intra-op threads per process (0: torch's default); 1 avoids contention on a small CPU")
    t.add_argument("--synthetic-users", type=int, default=None, help="users of the synthetic data (default 20000)")
    t.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("compare", help="print test metrics of finished runs with RelaImpr against the first")
    c.add_argument("runs", nargs="+", help="output folders; the first is the base")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "compare":
        runs = []
        for folder in args.runs:
            with open(os.path.join(folder, "metrics.json")) as f:
                runs.append(json.load(f))
        print(compare_table(runs))
        return 0
    synthetic = None
    if args.synthetic_users is not None:
        synthetic = SyntheticConfig(num_users=args.synthetic_users, seed=args.seed)
    config = TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, out=args.out, activation=args.activation,
        att_activation=args.att_activation, mba_lambda=args.mba_lambda, backend=args.backend, layout=args.layout,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, epochs=args.epochs,
        patience=args.patience, max_steps=args.max_steps, max_len=args.max_len, seed=args.seed,
        threads=args.threads or None, progress=not args.no_progress, synthetic=synthetic,
    )
    train(config)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
