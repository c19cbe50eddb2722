"""``python -m din_kernels``: flags checked at parse time, --help's defaults, eval of a saved run, --resume, and a
run killed with SIGKILL in the middle of an epoch."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_runs import cli, outcome, source_env

from din_kernels import load_run
from din_kernels import train as T
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic

BAD_NUMBERS = [
    ("--epochs", "0"), ("--epochs", "1.5"), ("--batch-size", "0"), ("--batch-size", "-3"), ("--lr", "0"),
    ("--lr", "nan"), ("--lr", "fast"), ("--mba-lambda", "-1e-3"), ("--mba-lambda", "inf"), ("--patience", "-1"),
    ("--max-steps", "0"), ("--eval-batch-size", "0"), ("--max-len", "0"), ("--seed", "-1"), ("--seed", "4294967296"),
    ("--threads", "-2"), ("--synthetic-users", "5"),
]


@pytest.mark.parametrize("flag, value", BAD_NUMBERS)
def test_numeric_flags_are_checked_at_parse_time(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        T.main(["train", "--out", str(tmp_path / "run"), f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"python -m din_kernels train: error: argument {flag}: must be (an integer|a number) "
                        rf".+, got '{re.escape(value)}'", err), err
    assert not (tmp_path / "run").exists()


def test_every_numeric_flag_is_checked():
    flags = {flag for flag, _ in BAD_NUMBERS}
    assert flags == {"--" + name.replace("_", "-") for name in T.BOUNDS} | {"--synthetic-users"}


def _help_entries(text: str) -> dict[str, str]:
    """``{flag: its help text on one line}`` from argparse's --help output."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-\S+)(.*)$", line)
        if m:
            flag = m.group(1).rstrip(",")
            entries[flag] = m.group(2)
        elif flag and line.startswith("   "):
            entries[flag] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_shows_the_defaults_the_code_uses(capsys):
    with pytest.raises(SystemExit) as e:
        T.main(["train", "--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    code = T.TrainConfig()
    shown = {}
    for flag, text in entries.items():
        m = re.search(r"\(default: ([^)]*)\)$", text)
        if m:
            shown[flag] = m.group(1)
    for field in ("model", "dataset", "activation", "mba_lambda", "backend", "layout", "batch_size",
                  "eval_batch_size", "lr", "optimizer", "epochs", "patience", "max_len", "seed", "threads"):
        assert shown.pop("--" + field.replace("_", "-")) == str(getattr(code, field)), field
    assert shown.pop("--synthetic-users") == str(SyntheticConfig().num_users) == "12000"
    assert shown == {"--att-activation": "--activation", "--max-steps": "no limit"}
    assert "--data-dir" in entries and "--out" in entries and "--resume" in entries


def test_a_run_that_would_make_no_step_is_a_flag_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(["train", "--synthetic-users", "500", "--batch-size", "100000", "--out", str(out)]) == 2
    n = generate_synthetic(SyntheticConfig(num_users=500)).num_samples("train")
    assert capsys.readouterr().err == (
        "python -m din_kernels train: error: argument --batch-size: 100000 (x 1 process(es)) is more than the "
        f"{n} training samples of 'synthetic': no optimisation step would be made\n")
    assert not out.exists()


@pytest.fixture(scope="module")
def din_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("din_run")
    assert T.main(["train", "--synthetic-users", "200", "--epochs", "2", "--batch-size", "64", "--backend", "torch",
                   "--no-progress", "--out", str(out)]) == 0
    return out


def _eval(capsys, *args):
    capsys.readouterr()
    assert T.main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_scores_a_saved_run_on_a_split(din_run, capsys):
    metrics = json.load(open(din_run / "metrics.json"))
    test = _eval(capsys, "--run", str(din_run))
    assert test["split"] == "test" and test["dataset"] == "synthetic" and test["samples"] == 200
    assert (test["auc"], test["gauc"], test["logloss"]) == (
        metrics["test_auc"], metrics["test_gauc"], metrics["test_logloss"])
    val = _eval(capsys, "--run", str(din_run / "model.pt"), "--split", "val", "--layout", "jagged",
                "--batch-size", "7", "--dataset", "synthetic")
    assert val["samples"] == 200
    assert val["auc"] == pytest.approx(metrics["val_auc"], abs=1e-6)
    assert val["gauc"] == pytest.approx(metrics["val_gauc"], abs=1e-6)
    assert _eval(capsys, "--run", str(din_run), "--backend", "reference")["auc"] == pytest.approx(test["auc"],
                                                                                                  abs=1e-6)


def test_eval_refuses_data_of_other_fields(din_run, capsys, monkeypatch):
    monkeypatch.setattr(T, "load_dataset", lambda *a, **k: generate_synthetic(SyntheticConfig.tiny()))
    assert T.main(["eval", "--run", str(din_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m din_kernels eval: error: argument --dataset: 'synthetic' does not have the "
                          "fields of the run in")


def test_resume_flags(din_run, tmp_path, capsys):
    assert T.main(["train", "--out", str(tmp_path), "--resume"]) == 2
    assert capsys.readouterr().err == (f"python -m din_kernels train: error: argument --resume: there is no last.pt "
                                       f"in '{tmp_path}' to resume from (no epoch of a run there has finished)\n")
    for flags, shown in ((["--lr", "0.01"], "--lr: 0.01 differs from the run's 0.005"),
                         (["--synthetic-users", "300"], "--synthetic-users: 300 differs from the run's 200"),
                         (["--seed", "0", "--model", "base"], "--model: 'base' differs from the run's 'din'")):
        assert T.main(["train", "--out", str(din_run), "--resume", *flags]) == 2
        assert shown in capsys.readouterr().err
    # the run's own values, and those that do not change the result, are accepted
    before = json.load(open(din_run / "metrics.json"))
    assert T.main(["train", "--out", str(din_run), "--resume", "--synthetic-users", "200", "--epochs", "2",
                   "--threads", "2", "--no-progress"]) == 0
    assert outcome(json.load(open(din_run / "metrics.json"))) == outcome(before)


def test_sigkill_during_an_epoch_then_resume_ends_as_the_uninterrupted_run(tmp_path):
    args = ["train", "--synthetic-users", "400", "--epochs", "3", "--batch-size", "16", "--mba-lambda", "0.01",
            "--backend", "torch", "--seed", "3", "--no-progress"]
    whole = cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "din_kernels", *args, "--out", str(out)], env=source_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists():  # epoch 1 is checkpointed (renamed in whole): epoch 2 is running
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.01)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    state = torch.load(out / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 3 and not state["done"]
    run = load_run(str(out))
    assert run.metrics is None and 1 <= run.epoch <= state["epoch"] and not run.model.training

    resumed = cli("train", "--out", str(out), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    a, b = (json.load(open(tmp_path / name / "metrics.json")) for name in ("whole", "killed"))
    assert outcome(b) == outcome(a)
    assert b["epochs_run"] == 3 and b["history"]["val"][-1]["auc"] > 0
