"""Training end to end on tiny synthetic data: outputs, early stopping, MBA counts, the CLI, DDP == one process,
settings checked before training, resuming an interrupted run, and the optional packages (train, plots)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_runs import cli_without, outcome, source_env, tiny_config

from din_kernels import DIN, load_run
from din_kernels import train as T
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic

PNG = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path, **kw):
    return tiny_config(tmp_path, **kw)


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
    run = load_run(str(tmp_path))
    model = run.model
    assert isinstance(model, DIN) and not model.training and run.epoch == saved["best_epoch"]
    assert run.metrics == json.load(open(tmp_path / "metrics.json"))
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


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("batch_size", 0), ("batch_size", 2.5), ("lr", 0.0), ("lr", float("nan")), ("mba_lambda", -0.1),
    ("patience", -1), ("max_steps", 0), ("eval_batch_size", 0), ("max_len", 0), ("seed", -1), ("seed", 2**32),
    ("threads", -1), ("model", "dnn"), ("optimizer", "rmsprop"), ("layout", "csr"), ("backend", "numpy"),
])
def test_config_names_a_setting_out_of_range(tmp_path, field, value):
    with pytest.raises(T.ConfigError, match=f"^{field}: must be .*got {value!r}") as e:
        _config(tmp_path, **{field: value})
    assert e.value.field == field
    config = _config(tmp_path)
    setattr(config, field, value)  # a config changed after construction is checked when it trains
    with pytest.raises(T.ConfigError, match=f"^{field}: "):
        T.train(config)
    assert not tmp_path.joinpath("model.pt").exists()


def test_synthetic_users_are_checked(tmp_path):
    with pytest.raises(T.ConfigError, match=r"^synthetic_users: must be an integer >= 10, got 3"):
        _config(tmp_path, synthetic=SyntheticConfig(num_users=3))


def test_a_run_that_would_make_no_step_is_an_error_before_training(tmp_path):
    out = tmp_path / "run"
    n_train = generate_synthetic(SyntheticConfig.tiny(seed=1)).num_samples("train")
    with pytest.raises(T.ConfigError, match=rf"^batch_size: {n_train + 1} \(x 1 process\(es\)\) is more than the "
                                            rf"{n_train} training samples of 'synthetic': no optimisation step"):
        T.train(_config(out, batch_size=n_train + 1))
    assert not out.exists()
    assert T.train(_config(out, batch_size=n_train, epochs=1))["steps"] == 1  # one full batch is one step


class _Interrupt(BaseException):
    pass


def test_resume_after_an_interrupted_epoch_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    """Dice (running statistics), MBA (counts) and Adam (moments) all carry state from epoch to epoch: an epoch
    interrupted before its end is redone from last.pt and the run ends exactly as the uninterrupted one."""
    kw = dict(activation="dice", mba_lambda=0.01, epochs=3, patience=5)
    whole = T.train(_config(tmp_path / "whole", **kw))

    real, calls = T.evaluate_split, []

    def interrupted(model, data, split, config):
        calls.append(split)
        if len(calls) == 2:  # epoch 2's validation: epoch 2 has trained, its checkpoint is not written
            raise _Interrupt
        return real(model, data, split, config)

    monkeypatch.setattr(T, "evaluate_split", interrupted)
    with pytest.raises(_Interrupt):
        T.train(_config(tmp_path / "cut", **kw))
    monkeypatch.setattr(T, "evaluate_split", real)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]["val"]) == 1 and not state["done"]
    assert load_run(str(tmp_path / "cut")).metrics is None  # the selected model so far, loadable
    assert not list((tmp_path / "cut").glob(".*.tmp"))

    resumed = T.train(_config(tmp_path / "cut", **kw), resume=True)
    assert outcome(resumed) == outcome(whole)
    assert resumed["epochs_run"] == 3 and resumed["steps"] == len(resumed["history"]["train_loss"]) > 0
    for name in ("model.pt", "last.pt"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)["model"]
        b = torch.load(tmp_path / "cut" / name, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # a finished run resumed again only reports its result
    assert outcome(T.train(_config(tmp_path / "cut", **kw), resume=True)) == outcome(whole)


def test_resume_keeps_the_run_settings(tmp_path):
    with pytest.raises(T.ConfigError, match=r"^resume: there is no last.pt in"):
        T.train(_config(tmp_path, epochs=1), resume=True)
    T.train(_config(tmp_path, epochs=1))
    with pytest.raises(T.ConfigError, match=r"^lr: the run in .* has 0.005, this config 0.01"):
        T.train(_config(tmp_path, epochs=1, lr=0.01), resume=True)
    # the settings that do not change the result may differ
    assert T.train(_config(tmp_path, epochs=1, threads=2, progress=True), resume=True)["epochs_run"] == 1


def test_without_matplotlib_the_run_finishes_with_one_warning(tmp_path):
    out = tmp_path / "run"
    r = cli_without(["matplotlib"], "train", "--synthetic-users", "200", "--epochs", "1", "--batch-size", "64",
                    "--backend", "torch", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.strip()]
    assert warnings == [f"warning: matplotlib is not installed, so {out} gets no curves.png or attention.png "
                        "(pip install 'din_kernels[plots]')"]
    assert "din test auc" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.json", "model.pt"]
    assert math.isfinite(json.load(open(out / "metrics.json"))["test_auc"])


def test_missing_train_packages_are_named_at_start_up(tmp_path):
    out = tmp_path / "run"
    r = cli_without(["pandas", "tqdm"], "train", "--synthetic-users", "200", "--out", str(out))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("python -m din_kernels train: error: this command needs pandas and tqdm, which are not "
                        "installed: pip install 'din_kernels[train]'\n")
    assert not out.exists()
    r = cli_without(["sklearn"], "eval", "--run", str(out))
    assert r.returncode == 2 and "needs scikit-learn, which is not installed: pip install 'din_kernels[train]'" \
        in r.stderr
    r = cli_without(["pandas", "sklearn", "tqdm", "matplotlib"], "train", "--help")
    assert r.returncode == 0 and "(default: 12000)" in r.stdout


def test_the_library_imports_without_the_extras():
    code = ("import sys\n"
            "for name in ('pandas', 'sklearn', 'tqdm', 'matplotlib'):\n"
            "    sys.modules[name] = None\n"
            "import din_kernels, din_kernels.train, din_kernels.metrics, din_kernels.runs\n"
            "from din_kernels.data import generate_synthetic, SyntheticConfig\n"
            "d = generate_synthetic(SyntheticConfig.tiny())\n"
            "print(din_kernels.DIN(d.schema)(d.batch('train', [0, 1, 2])).shape)\n"
            "try:\n"
            "    din_kernels.metrics.auc([0, 1], [0.2, 0.7])\n"
            "except ModuleNotFoundError as e:\n"
            "    print(e)\n"
            "try:\n"
            "    din_kernels.train.train(din_kernels.train.TrainConfig())\n"
            "except ModuleNotFoundError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=source_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [
        "torch.Size([3])",
        "sklearn.metrics is not installed (the 'scikit-learn' package): pip install 'din_kernels[train]'",
        "din_kernels.train.train needs pandas, scikit-learn and tqdm, which are not installed: "
        "pip install 'din_kernels[train]'",
    ]
