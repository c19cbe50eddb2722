"""Training end to end on tiny synthetic data: outputs, early stopping, MBA counts, the CLI, and DDP == one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from din_kernels import DIN
from din_kernels import train as T
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic
from din_kernels.nn.din import FeatureSchema, Field

PNG = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path, **kw):
    base = dict(model="din", synthetic=SyntheticConfig.tiny(seed=1), epochs=2, batch_size=64, out=str(tmp_path),
                progress=False, backend="torch")
    base.update(kw)
    return T.TrainConfig(**base)


def test_train_writes_metrics_checkpoint_and_plots(tmp_path):
    results = T.train(_config(tmp_path, mba_lambda=0.01))
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    for key in ("test_auc", "test_gauc", "test_logloss", "val_gauc", "samples_per_s", "time_per_epoch_s"):
        assert np.isfinite(saved[key]), key
        assert saved[key] == pytest.approx(results[key])
    assert 0 <= saved["test_auc"] <= 1 and saved["samples_per_s"] > 0
    assert saved["epochs_run"] == 2 and len(saved["history"]["train_loss"]) == saved["steps"]
    assert all(p > 0 for p in saved["history"]["mba_penalty"])
    for png in ("curves.png", "attention.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG
    ckpt = torch.load(tmp_path / "model.pt")
    schema = FeatureSchema(**{k: tuple(Field(**f) for f in v) for k, v in ckpt["schema"].items()})
    model = DIN(schema)
    model.load_state_dict(ckpt["model"])
    # the MBA counts n_j are those of the training split
    counts = generate_synthetic(SyntheticConfig.tiny(seed=1)).table_counts("train")
    for name, c in counts.items():
        assert torch.equal(model.tables[name].counts, c), name
    # the checkpoint is the selected model: its test metrics are the reported ones
    data = generate_synthetic(SyntheticConfig.tiny(seed=1))
    u, y, s = T.predict(model, data, "test")
    assert T.M.gauc(u, y, s) == pytest.approx(saved["test_gauc"], abs=1e-6)


def test_early_stopping_on_validation_gauc(tmp_path, monkeypatch):
    vals = iter([0.70, 0.72, 0.71, 0.69, 0.75, 0.76])
    real = T.evaluate_split

    def fake(model, data, split, config):
        out = real(model, data, split, config)
        if split == "val":
            out["gauc"] = next(vals)
        return out

    monkeypatch.setattr(T, "evaluate_split", fake)
    results = T.train(_config(tmp_path, model="base", epochs=6, patience=1))
    assert results["best_epoch"] == 2 and results["epochs_run"] == 4 and results["val_gauc"] == 0.72


def test_cli_train_and_compare(tmp_path, capsys):
    runs = []
    for model in ("base", "din"):
        out = str(tmp_path / model)
        assert T.main(["train", "--model", model, "--synthetic-users", "200", "--epochs", "1", "--batch-size", "64",
                       "--layout", "jagged", "--out", out, "--no-progress"]) == 0
        runs.append(out)
    capsys.readouterr()
    assert T.main(["compare", *runs]) == 0
    table = capsys.readouterr().out
    lines = table.strip().splitlines()
    assert "RelaImpr" in lines[0] and lines[1].startswith("base") and lines[2].startswith("din")
    assert "0.00%" in lines[1]  # the base against itself
    with pytest.raises(SystemExit):
        T.main(["train", "--model", "dnn", "--out", str(tmp_path)])


def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    """torchrun with 2 gloo processes x batch 16 == 1 process x batch 32: same parameters after a few steps, with
    MBA counted over the whole training split and applied once per distinct id of the global batch."""
    common = ["-m", "din_kernels", "train", "--model", "din", "--synthetic-users", "150", "--epochs", "1",
              "--max-steps", "4", "--mba-lambda", "0.5", "--backend", "torch", "--no-progress", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    one = subprocess.run([sys.executable, *common, "--batch-size", "32", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--batch-size", "16", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one" / "model.pt"), torch.load(tmp_path / "two" / "model.pt")
    assert json.load(open(tmp_path / "two" / "metrics.json"))["world_size"] == 2
    torch.manual_seed(0)  # the initial parameters of both runs (train() seeds with --seed 0 before building)
    init = DIN(generate_synthetic(SyntheticConfig(num_users=150)).schema).state_dict()
    assert a["model"].keys() == b["model"].keys()
    moved = 0
    for k, v in a["model"].items():
        assert torch.allclose(b["model"][k].double(), v.double(), rtol=1e-4, atol=1e-6), k
        moved += int(not torch.equal(v, init[k])) if k in init and v.is_floating_point() else 0
    assert moved > 5  # training did move the parameters
