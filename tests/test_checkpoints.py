"""The files of a run: load_run / from_checkpoint rebuild the model from them alone, on a given device and backend;
every file is written atomically, so a process killed mid-write leaves the previous file whole."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tiny_runs import source_env, tiny_config

from din_kernels import DIN, BaseModel, load_run
from din_kernels import runs as R
from din_kernels import train as T
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic
from din_kernels.nn.din import FeatureSchema


@pytest.fixture(scope="module")
def din_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("din")
    return out, T.train(tiny_config(out, mba_lambda=0.01))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    T.train(tiny_config(out, model="base", epochs=1))
    return out


def _test_logits(model):
    data = generate_synthetic(SyntheticConfig.tiny(seed=1))
    return T.predict(model, data, "test")


def test_load_run_rebuilds_schema_and_model(din_run):
    out, results = din_run
    run = load_run(str(out))
    data = generate_synthetic(SyntheticConfig.tiny(seed=1))
    assert run.schema == data.schema and isinstance(run.schema, FeatureSchema)
    assert isinstance(run.model, DIN) and not run.model.training and run.model.backend == "torch"
    assert run.config["model"] == "din" and run.config["mba_lambda"] == 0.01 and run.epoch == results["best_epoch"]
    assert run.metrics["test_gauc"] == results["test_gauc"] and run.path == str(out)
    u, y, s = _test_logits(run.model)
    assert T.M.gauc(u, y, s) == results["test_gauc"] and T.M.auc(y, s) == results["test_auc"]
    # the MBA counts n_j of the training split are part of the model
    for name, c in data.table_counts("train").items():
        assert torch.equal(run.model.tables[name].counts, c), name
    # the same model by its file, and through the class
    same = load_run(str(out / "model.pt")).model
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), same.state_dict().values()))
    assert np.array_equal(_test_logits(DIN.from_checkpoint(str(out)))[2], s)
    assert type(BaseModel.from_checkpoint(str(out / "model.pt"))) is DIN


def test_from_checkpoint_checks_the_model_kind(base_run):
    model = BaseModel.from_checkpoint(str(base_run))
    assert type(model) is BaseModel and not model.training
    with pytest.raises(ValueError, match=r"holds a BaseModel, not a DIN"):
        DIN.from_checkpoint(str(base_run))


def test_load_run_on_another_backend_and_device(din_run):
    out, _ = din_run
    ref = load_run(str(out), device=torch.device("cpu"), backend="reference").model
    assert ref.backend == "reference" and ref.attention.backend == "reference"
    torch.testing.assert_close(_test_logits(ref)[2], _test_logits(load_run(str(out)).model)[2], rtol=1e-5,
                               atol=1e-5)
    meta = load_run(str(out), device="meta").model
    assert all(p.device.type == "meta" for p in meta.parameters())


@pytest.mark.gpu
def test_load_run_on_a_gpu(din_run):
    out, results = din_run
    model = load_run(str(out), device="cuda", backend="auto").model
    assert all(p.is_cuda for p in model.parameters())
    u, y, s = _test_logits(model)
    assert T.M.gauc(u, y, s) == pytest.approx(results["test_gauc"], abs=1e-3)


def test_checkpoints_load_with_weights_only(din_run):
    out, _ = din_run
    for name in ("model.pt", "last.pt"):
        ck = torch.load(out / name, weights_only=True)
        assert ck["format"] == R.FORMAT and ck["config"]["model"] == "din", name
    assert FeatureSchema.from_dict(torch.load(out / "model.pt", weights_only=True)["schema"]) == \
        generate_synthetic(SyntheticConfig.tiny(seed=1)).schema
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_run(str(out / "nothing"))


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    R.save({"x": torch.arange(3)}, path)
    real = torch.save

    def half_then_interrupt(obj, f):
        real(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        R.save({"x": torch.arange(1000)}, path)
    monkeypatch.setattr(torch, "save", real)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["model.pt"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sigkill_while_writing_leaves_a_whole_file(tmp_path):
    """A process rewrites a 32 MB checkpoint in a loop and is killed while a temporary file is being written: the
    checkpoint is one whole version, and the next run's start clears the truncated temporary file."""
    path = tmp_path / "model.pt"
    code = ("import sys, torch\n"
            "from din_kernels import runs\n"
            "for i in range(10**6):\n"
            "    runs.save({'i': i, 'x': torch.full((8_000_000,), float(i))}, sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=source_env())
    partial = []
    try:
        deadline = time.monotonic() + 120
        while not partial:
            assert proc.poll() is None and time.monotonic() < deadline
            if path.exists():  # a whole version is there: kill during the next write
                partial = [p for p in tmp_path.glob(".model.pt.*.tmp") if 0 < _size(p) < _size(path)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    ck = torch.load(path, weights_only=True)
    assert torch.equal(ck["x"], torch.full((8_000_000,), float(ck["i"])))
    left = list(tmp_path.glob(".model.pt.*.tmp"))
    assert all(_size(p) < _size(path) for p in left)  # what the kill cut short, if the write had not ended
    T.train(tiny_config(tmp_path, epochs=1))  # a run in the folder starts by clearing them
    assert not list(tmp_path.glob(".*.tmp"))


def _size(p) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def test_the_readme_loading_snippet_runs(din_run):
    out, results = din_run
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0].replace("runs/din", str(out))
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert isinstance(scope["model"], DIN) and scope["run"].metrics["test_auc"] == results["test_auc"]
