"""Tiny training runs and subprocess runners shared by the training, CLI, checkpoint and packaging tests."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

from din_kernels import train as T
from din_kernels.data.synthetic import SyntheticConfig

# what differs between two runs of the same settings: wall-clock timings
TIMINGS = ("samples_per_s", "time_per_epoch_s", "load_s")


def tiny_config(out, **kw) -> T.TrainConfig:
    """A DIN run of 2 epochs on 300 synthetic users (about 1 s)."""
    config = T.TrainConfig(model="din", synthetic=SyntheticConfig.tiny(seed=1), epochs=2, batch_size=64,
                           out=str(out), progress=False, backend="torch")
    return replace(config, **kw)


def outcome(metrics: dict) -> dict:
    """A run's metrics without its timings: equal for two runs of the same settings and seed."""
    out = {k: v for k, v in metrics.items() if k not in TIMINGS}
    out["history"] = {k: v for k, v in metrics["history"].items() if k != "epoch_s"}
    return out


def source_env() -> dict:
    """The environment for a subprocess that imports din_kernels from this checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m din_kernels ARGS`` in a subprocess (a crash is a test failure, not a test-runner crash)."""
    return subprocess.run([sys.executable, "-m", "din_kernels", *args], capture_output=True, text=True,
                          env=source_env(), timeout=timeout, **kw)


def cli_without(modules: list[str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m din_kernels ARGS`` in a subprocess where importing any of ``modules`` fails as if it were not
    installed."""
    code = ("import sys\n"
            f"for name in {modules!r}:\n"
            "    sys.modules[name] = None\n"
            "from din_kernels.train import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=source_env(),
                          timeout=timeout)
