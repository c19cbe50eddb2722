"""What each install gives: setup.py's extras are the ones the code names, and a fresh virtual environment with
only torch, numpy and the package imports it, runs the README's usage snippet, loads a saved run, and gets the
name of the extra to install from ``python -m din_kernels train``."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tiny_runs import tiny_config

from din_kernels import _extras
from din_kernels import train as T
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_keywords() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}


def test_setup_extras_are_the_ones_the_code_names():
    kw = _setup_keywords()
    assert [re.split(r"[<>=;]", r)[0] for r in kw["install_requires"]] == ["torch", "numpy"]
    extras = {name: sorted(re.split(r"[<>=;]", r)[0] for r in reqs) for name, reqs in kw["extras_require"].items()}
    for extra, modules in _extras.EXTRAS.items():
        assert extras[extra] == sorted(dist for _, dist in modules), extra
    assert set(extras) == {*_extras.EXTRAS, "triton"}


def _readme_usage() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("\n## Usage\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _pinned(name: str) -> str:
    for line in open(os.path.join(ROOT, "requirements.txt")):
        if line.split("==")[0].strip() == name:
            return line.split("#")[0].strip()
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def _makefile_install_env() -> dict:
    """The variables the Makefile sets on its ``pip install ... -e .`` of the package (e.g. a pure-Python build)."""
    for line in open(os.path.join(ROOT, "Makefile")):
        if "pip install" in line and "-e ." in line:
            return dict(re.findall(r"(\w+)=(\S+)\s", line.split("$(PY)", 1)[0]))
    raise AssertionError("no 'pip install ... -e .' line in the Makefile")


def _copy_source(dest: str) -> None:
    """The files git tracks (and the untracked ones it does not ignore), as in the working tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
                    reason="needs the git checkout")
def test_bare_core_install(tmp_path):
    venv, src, work = tmp_path / "venv", tmp_path / "src", tmp_path / "work"
    work.mkdir()
    # a run saved by the full install, and its test logits, for the bare install to load
    run_dir = tmp_path / "run"
    T.train(tiny_config(run_dir, epochs=1))
    data = generate_synthetic(SyntheticConfig.tiny(seed=1))
    expected = T.predict(T.runs.load_model(str(run_dir)), data, "test")[2]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(_makefile_install_env())
    py = str(venv / "bin" / "python")

    def run(*args, cwd=work, check=True, timeout=600):
        r = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r

    try:
        run(sys.executable, "-m", "venv", str(venv))
        pip = (py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
        run(*pip, _pinned("torch"), _pinned("numpy"), _pinned("setuptools"))  # setuptools: the build, as the Makefile
        _copy_source(str(src))
        # the Makefile's install, but a regular one (not editable) from a copy of the checkout
        run(*pip, "--no-build-isolation", "--no-deps", str(src))
        shutil.rmtree(src)
        absent = run(py, "-c", "import importlib.util as u; print([m for m in ('pandas', 'sklearn', 'tqdm', "
                                "'matplotlib', 'triton') if u.find_spec(m)])").stdout.strip()
        assert absent == "[]", f"the bare environment has {absent}"

        # the core: import, the README's usage snippet, a saved run loaded and scored
        snippet = _readme_usage() + "\nprint(tuple(user.shape), tuple(logit.shape))\n"
        assert run(py, "-c", snippet).stdout.split() == ["(256,", "64)", "(256,", "1)"]
        score = textwrap.dedent(f"""
            import numpy as np, torch, din_kernels
            from din_kernels.data import SyntheticConfig, generate_synthetic
            torch.set_num_threads(1)  # as the run that computed the expected logits
            run = din_kernels.load_run({str(run_dir)!r})
            data = generate_synthetic(SyntheticConfig.tiny(seed=1))
            idx = np.arange(data.num_samples("test"))
            with torch.no_grad():
                logits = torch.cat([run.model(data.batch("test", idx[i:i + 2048])) for i in range(0, idx.size, 2048)])
            np.save({str(work / "logits.npy")!r}, logits.numpy())
            print(din_kernels.__file__)
        """)
        where = run(py, "-c", score).stdout.strip()
        assert where.startswith(str(venv)), where  # the installed package, not the checkout
        np.testing.assert_array_equal(np.load(work / "logits.npy"), expected)

        # the command: --help works, the train extra is named before anything runs
        assert "(default: 12000)" in run(py, "-m", "din_kernels", "train", "--help").stdout
        assert "train" in run(py, "-m", "din_kernels", "--help").stdout
        for command in (["train", "--out", str(work / "new"), "--synthetic-users", "100"],
                        ["eval", "--run", str(run_dir)]):
            r = run(py, "-m", "din_kernels", *command, check=False)
            assert r.returncode == 2 and r.stdout == "", r.stderr
            assert r.stderr == (f"python -m din_kernels {command[0]}: error: this command needs pandas, scikit-learn "
                                "and tqdm, which are not installed: pip install 'din_kernels[train]'\n")
        assert not (work / "new").exists()
        r = run(py, "-m", "din_kernels", "train", "--out", str(work / "new"), "--epochs", "0", check=False)
        assert r.returncode == 2 and "argument --epochs: must be an integer >= 1, got '0'" in r.stderr
        assert json.loads(run(py, "-c", "import json, din_kernels; print(json.dumps(din_kernels.__all__))")
                          .stdout) == __import__("din_kernels").__all__
    finally:
        shutil.rmtree(venv, ignore_errors=True)
