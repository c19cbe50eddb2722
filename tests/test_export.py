"""Export of ``rank`` as an AOTInductor package (din_kernels.serving, ``python -m din_kernels export``,
examples/rank): the package from Python and from the C++ example against eager ``rank`` on batches of other sizes
than the example's (U = 0 and 1, users without candidates or history, T = 0), padded and jagged, on the compiled
``cpu`` backend and on ``torch`` (decomposed into aten ops); the ops left in the package; the input checks of
:func:`din_kernels.load` and the package's memory safety without them. Every package runs in a subprocess."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from tiny_runs import cli, source_env, tiny_config

import din_kernels as dk
from din_kernels import _extension, serving
from din_kernels import train as T
from din_kernels.backend import BackendUnavailableError
from din_kernels.nn.din import FeatureSchema, Field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "rank")
BUILD = os.path.join(ROOT, "build", "examples-rank")  # kept between runs (gitignored): a rebuild is a no-op

needs_extension = pytest.mark.skipif(not _extension.loaded(), reason="the compiled extension din_kernels._C is not "
                                     "built (the cpu backend's ops are what the package calls)")

SCHEMA = FeatureSchema(
    item_fields=(Field("goods_id", 60, 8), Field("cate_id", 9, 4)),
    user_fields=(Field("gender", 3, 4), Field("age", 8, 4)),
    user_multi_fields=(Field("tags", 21, 4),),
    context_fields=(Field("slot", 6, 4),),
)

# (users, candidates per user on average, T, multi-hot width, seed): none of them the example's (4, 3, 8, 3)
SIZES = [(1, 2, 5, 2, 1), (7, 5, 13, 5, 2), (2, 1, 3, 1, 3), (3, 2, 0, 4, 4), (0, 2, 6, 3, 5), (5, 4, 1, 0, 6)]

RUNNER = """
import sys, torch, din_kernels
package = din_kernels.load(sys.argv[1])
with din_kernels.checks(sys.argv[4] == "1"):
    torch.save([package(*case) for case in torch.load(sys.argv[2])], sys.argv[3])
"""


def _model(backend: str, cls: type[dk.BaseModel] = dk.DIN, **kw) -> dk.BaseModel:
    """A model in eval mode whose Dice statistics and alphas are not the initial ones (so they matter)."""
    torch.manual_seed(0)
    model = cls(SCHEMA, activation="dice", backend=backend, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dk.Dice):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.alpha.uniform_(0.1, 0.6)
    return model.eval()


def _cases(model: dk.BaseModel, layout: str) -> list[tuple]:
    """Batches of :data:`SIZES`, one whose users have no candidate at all (Nq = 0) and one of one user with one
    behaviour and one candidate (U = Nq = T = 1, one jagged row)."""
    vocab = serving.input_vocab(model, layout)
    cases = [serving.random_batch(vocab, layout, U, C, T_, L, seed=s) for U, C, T_, L, s in SIZES]
    batch, cands, offsets = serving.random_batch(vocab, layout, 3, 2, 4, seed=7)
    cases.append((batch, cands[:0], torch.zeros_like(offsets)))
    batch, cands, _ = serving.random_batch(vocab, layout, 1, 1, 1, 1, seed=8)
    cases.append((batch, cands[:1], torch.tensor([0, 1])))
    return cases


def _eager(model: dk.BaseModel, cases: list[tuple]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model.rank(*case) for case in cases]


def _run_package(path: str, cases: list[tuple], tmp_path, checks: bool = True) -> list[torch.Tensor]:
    """The package's logits for each case, from ``din_kernels.load`` in a subprocess."""
    inputs, outputs = tmp_path / "cases.pt", tmp_path / "logits.pt"
    torch.save(cases, inputs)
    run = subprocess.run([sys.executable, "-c", RUNNER, path, str(inputs), str(outputs), "1" if checks else "0"],
                         capture_output=True, text=True, env=source_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(outputs)


def _assert_equal_logits(got: list[torch.Tensor], want: list[torch.Tensor], cases: list[tuple]) -> None:
    assert len(got) == len(want)
    for g, w, (_, cands, _) in zip(got, want, cases):
        assert g.shape == w.shape == (cands.shape[0],)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _ops(program) -> set[str]:
    return {n.target.name() for n in program.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}


@pytest.fixture(scope="module")
def cpu_package(tmp_path_factory):
    """A DIN on the compiled cpu backend (the attention with prelu, the MLP with Dice), exported with padded batches:
    ``(model, path)``."""
    if not _extension.loaded():
        pytest.skip("the compiled extension din_kernels._C is not built")
    model = _model("cpu", att_activation="prelu")
    example = serving.random_batch(serving.input_vocab(model, "padded"), "padded")
    path = dk.export(model, example[0], tmp_path_factory.mktemp("package") / "din.pt2", example[1], example[2])
    return model, path


def test_package_equals_eager_rank_cpu(cpu_package, tmp_path):
    model, path = cpu_package
    package = dk.load(path)
    assert package.layout == "padded"
    assert package.input_names == ["hist", "hist_len", "user", "tags", "context", "candidates", "candidate_offsets"]
    ops = package.metadata[serving.META_OPS].split(",")
    assert ops == ["din_kernels::dice_fwd", "din_kernels::target_attention_fwd"]  # the C++ ops, no Python op
    cases = _cases(model, "padded")
    assert any(c[2].shape[0] == 1 for c in cases) and any(c[0]["hist"].shape[1] == 0 for c in cases)
    _assert_equal_logits(_run_package(path, cases, tmp_path), _eager(model, cases), cases)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("backend, cls, att_activation", [
    ("cpu", dk.DIN, "dice"), ("cpu", dk.DIN, "prelu"), ("cpu", dk.DIN, "sigmoid"), ("torch", dk.DIN, "dice"),
    ("torch", dk.BaseModel, None)])
def test_exported_program_ops(backend, cls, att_activation, layout):
    """What the package runs: on cpu the compiled attention (every tensor list non-empty: the proxy executor cannot
    pass an empty one; sigmoid's act_weights are empty placeholders) and the compiled Dice, on torch aten only; the
    exported program (before Inductor) equals eager rank on other sizes."""
    if backend == "cpu" and not _extension.loaded():
        pytest.skip("the compiled extension din_kernels._C is not built")
    kw = {"att_activation": att_activation, "att_normalization": "softmax" if layout == "jagged" else "none"} \
        if cls is dk.DIN else {}
    model = _model(backend, cls=cls, **kw)
    example = serving.random_batch(serving.input_vocab(model, layout), layout)
    program, metadata = serving.export_program(model, *example)
    ours = {op for op in _ops(program) if op.startswith("din_kernels::")}
    compiled = {"din_kernels::dice_fwd", "din_kernels::target_attention_fwd"}
    assert ours == (compiled if backend == "cpu" else set())
    assert metadata[serving.META_OPS] == ",".join(sorted(ours))
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target) == "din_kernels.target_attention_fwd.default":
            assert all(len(tensors) for tensors in node.args[5:10]), node.args[5:10]
    assert "aten::embedding" in _ops(program)
    assert metadata[serving.META_LAYOUT] == layout
    names = metadata[serving.META_INPUTS].split(",")
    module = program.module()
    # sizes >= 2 only: the unlifted program checks torch.export's 0/1 specialisation (the package does not, and runs
    # sizes 0 and 1 in the tests above and below)
    vocab = serving.input_vocab(model, layout)
    cases = [serving.random_batch(vocab, layout, U, C, T_, L, seed=s) for U, C, T_, L, s in SIZES
             if min(U, T_, L) >= 2]
    with torch.no_grad():
        got = [module(*serving._flat_inputs(names, *case)) for case in cases]
    _assert_equal_logits(got, _eager(model, cases), cases)


@pytest.mark.parametrize("layout, normalization", [("padded", "none"), ("jagged", "softmax")])
def test_torch_backend_package(layout, normalization, tmp_path):
    """The torch backend compiled from aten ops (jagged: the pairs of candidates and behaviours are a data-dependent
    size)."""
    model = _model("torch", att_normalization=normalization)
    example = serving.random_batch(serving.input_vocab(model, layout), layout)
    path = dk.export(model, example[0], tmp_path / "din.pt2", example[1], example[2])
    assert dk.load(path).metadata[serving.META_OPS] == ""
    cases = _cases(model, layout)
    _assert_equal_logits(_run_package(path, cases, tmp_path), _eager(model, cases), cases)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_python_ops_are_refused():
    """Triton interpreted on the CPU runs as a Python op: export names it and says which backend to use."""
    model = _model("triton")
    example = serving.random_batch(serving.input_vocab(model, "padded"), "padded")
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' runs \['din_kernels::dice_fwd_triton', "
                                                      r"'din_kernels::target_attention_fwd_triton'\].*backend 'cpu'"):
        serving.export_program(model, *example)


def test_bad_examples_are_refused():
    model = _model("torch")
    batch, cands, offsets = serving.random_batch(serving.input_vocab(model, "padded"), "padded", users=1)
    with pytest.raises(ValueError, match=r"at least 2 of every dynamic size .*'U': 1"):
        serving.export_program(model, batch, cands, offsets)
    batch, cands, offsets = serving.random_batch(serving.input_vocab(model, "padded"), "padded", max_len=1)
    with pytest.raises(ValueError, match=r"'T \(hist.shape\[1\]\)': 1"):
        serving.export_program(model, batch, cands, offsets)
    with pytest.raises(TypeError, match="DIN or BaseModel"):
        serving.export_program(torch.nn.Linear(2, 2), batch, cands, offsets)
    with pytest.raises(ValueError, match="exactly one of 'hist_len'"):
        serving.export_program(model, {"hist": batch["hist"]}, cands, offsets)


CHECKER = """
import json, sys, torch, din_kernels
package = din_kernels.load(sys.argv[1])
batch, cands, offsets = torch.load(sys.argv[2])
errors = {}
def bad(name, **change):
    b = dict(batch, **{k: v for k, v in change.items() if k not in ("candidates", "candidate_offsets")})
    try:
        package(b, change.get("candidates", cands), change.get("candidate_offsets", offsets))
        errors[name] = None
    except ValueError as e:
        errors[name] = str(e)
n = cands.shape[0]
bad("goods id", candidates=cands.clone().index_fill_(0, torch.tensor([0]), 60))
bad("tags id", tags=batch["tags"] - 1)
bad("hist_len", hist_len=batch["hist_len"] + 100)
bad("candidate_offsets", candidate_offsets=offsets.flip(0))
bad("hist rows", hist=batch["hist"][:1])
bad("layout", hist_offsets=torch.zeros(5, dtype=torch.long))
bad("user width", user=batch["user"][:, :1])
garbage = dict(batch, hist=batch["hist"] * 1000 - 7, hist_len=batch["hist_len"] * 50 - 9,
               tags=batch["tags"] * -13, user=batch["user"] + 10**6, context=batch["context"] - 10**6)
bad_cands, bad_offsets = cands * 999 - 5, offsets * 3 - 4
with din_kernels.checks(False):
    out = package(garbage, bad_cands, bad_offsets)
torch.save((garbage, bad_cands, bad_offsets, out), sys.argv[3])
print(json.dumps(errors))
"""


def test_load_checks_inputs_and_the_package_is_memory_safe(cpu_package, tmp_path):
    """With checks on, din_kernels.load's callable raises eager rank's errors; with them off, garbage ids, lengths and
    offsets run (memory-safe: the package clamps every index) and give what eager rank gives with the checks off."""
    model, path = cpu_package
    case = serving.random_batch(serving.input_vocab(model, "padded"), "padded", 3, 2, 5, seed=11)
    torch.save(case, tmp_path / "case.pt")
    run = subprocess.run([sys.executable, "-c", CHECKER, path, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, env=source_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert "ids must lie in [0, 59]" in errors["goods id"]
    assert "ids must lie in [0, 20]" in errors["tags id"]
    assert "lengths must lie in [0, T] = [0, 5]" in errors["hist_len"]
    assert "candidate_offsets[0] must be 0" in errors["candidate_offsets"]
    assert "hist has 1 rows but candidate_offsets gives U = 3" in errors["hist rows"]
    assert "exactly one of 'hist_len'" in errors["layout"]
    assert "user must be [U, 2]" in errors["user width"]
    garbage, bad_cands, bad_offsets, out = torch.load(tmp_path / "out.pt")
    with torch.no_grad(), dk.checks(False):
        want = model.rank(garbage, bad_cands, bad_offsets)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_cli_exports_a_run(tmp_path):
    """``python -m din_kernels export --run DIR --out FILE.pt2`` of a run trained on backend torch (attention with
    Dice, the MLP with prelu), jagged: the package (on the backend auto picks) equals the run's model's rank."""
    run_dir = tmp_path / "run"
    T.train(tiny_config(run_dir, epochs=1, att_activation="dice"))
    out = tmp_path / "din.pt2"
    result = cli("export", "--run", str(run_dir), "--out", str(out), "--layout", "jagged")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["package"] == str(out) and printed["layout"] == "jagged" and out.is_file()
    if _extension.loaded():
        assert "din_kernels::target_attention_fwd" in printed["compiled_ops"]
    model = dk.load_run(str(run_dir)).model
    cases = _cases(model, "jagged")
    _assert_equal_logits(_run_package(str(out), cases, tmp_path), _eager(model, cases), cases)
    missing = cli("export", "--run", str(tmp_path / "none"), "--out", str(out))
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr


def _build_example() -> str:
    """Builds examples/rank with CMake into build/examples-rank (a no-op when up to date); the binary's path."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed (the C++ example builds with it)")
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler (c++, g++ or clang++) on the PATH")
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not os.path.isfile(os.path.join(BUILD, "Makefile")) \
        else []
    configure = ["cmake", "-S", EXAMPLE, "-B", BUILD, *generator,
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for cmd in (configure, ["cmake", "--build", BUILD, "-j", "2"]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{' '.join(cmd)}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return os.path.join(BUILD, "rank")


@needs_extension
def test_cpp_example_equals_eager_rank(cpu_package, tmp_path):
    """examples/rank: make_inputs.py writes a batch, the C++ program (libtorch's AOTIModelPackageLoader, the
    extension dlopen'ed) prints its logits: equal to eager rank (and to the Python package), with 1 and 2 threads."""
    model, path = cpu_package
    start = time.perf_counter()
    binary = _build_example()
    build_s = time.perf_counter() - start
    inputs, py_logits = tmp_path / "inputs.pt", tmp_path / "logits.txt"
    make = subprocess.run([sys.executable, os.path.join(EXAMPLE, "make_inputs.py"), path, str(inputs), "--users", "6",
                           "--candidates", "4", "--max-len", "11", "--seed", "3", "--logits", str(py_logits)],
                          capture_output=True, text=True, env=source_env(), timeout=300)
    assert make.returncode == 0, make.stderr[-3000:]
    saved = torch.load(inputs)
    batch = {k: v for k, v in saved.items() if k not in ("candidates", "candidate_offsets")}
    assert (saved["candidate_offsets"][1:] == saved["candidate_offsets"][:-1]).any()  # a user without candidates
    with torch.no_grad():
        want = model.rank(batch, saved["candidates"], saved["candidate_offsets"])
    extension = importlib.import_module("din_kernels._C").__file__
    for threads in ("1", "2"):
        run = subprocess.run([binary, path, extension, str(inputs), threads, "20"], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        got = torch.tensor([float(line) for line in run.stdout.split()])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert f"{threads} threads" in run.stderr
    python = torch.tensor([float(line) for line in py_logits.read_text().split()])
    torch.testing.assert_close(python, want, rtol=1e-5, atol=1e-6)
    print(f"C++ example: build {build_s:.1f} s; {run.stderr.strip()}")
    bad = subprocess.run([binary, path, "/nonexistent.so", str(inputs)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "cannot load /nonexistent.so" in bad.stderr
