"""The benchmark harness itself (benchmarks/): the row schema, the floor arithmetic, skipping what cannot run, the
peers computing our function, the report and the README rewrite. Fast: no benchmark is run."""

import argparse
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import cases, floor, measure, readme_results, report  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402

CPU = torch.device("cpu")


def _runner(tmp_path=None):
    args = bench_run.parse_args(["--out", str(tmp_path or ROOT)])
    peaks = floor.Peaks(device="Test CPU (2 threads)", flops={"float32": 1e11}, bandwidth=1e10)
    return bench_run.Runner(args, CPU, [torch.float32], peaks)


def test_row_schema():
    runner = _runner()
    shape = {"B": 4, "T": 3, "D": 2, "hidden": [8, 4], "activation": "sigmoid"}
    row = runner.add("attention", "torch", shape, torch.float32, "full", measure.Timing(2.0, 1.5, 2.5, 7),
                     {"N": 9}, 12.5)
    report.check_row(row)
    for key in ("op", "provider", "mode", "B", "T", "D", "hidden", "dtype", "device", "median_ms", "p20_ms",
                "p80_ms", "peak_mem_mb", "floor_ms", "torch", "git", "flops", "bytes"):
        assert key in row, key
    assert row["status"] == "ok" and row["dtype"] == "float32" and row["torch"] == torch.__version__
    cost = floor.attention_cost(4, 9, 2, (8, 4), "full", 4)
    assert row["floor_ms"] == pytest.approx(floor.floor_ms(cost, 1e11, 1e10))
    bad = dict(row)
    del bad["p80_ms"]
    with pytest.raises(ValueError, match="p80_ms"):
        report.check_row(bad)
    with pytest.raises(ValueError, match="p20 <= median <= p80"):
        report.check_row({**row, "p20_ms": 3.0})


def test_floor_arithmetic():
    # the larger of the two limits, in ms
    assert floor.floor_ms(floor.Cost(2e9, 1e9), 1e12, 1e11) == pytest.approx(10.0)  # memory bound: 1e9 / 1e11 s
    assert floor.floor_ms(floor.Cost(2e9, 1e6), 1e12, 1e11) == pytest.approx(2.0)  # compute bound: 2e9 / 1e12 s
    # attention at the headline shape, by hand: D = 128, hidden (80, 40), sigmoid (4 FLOPs per element)
    per_sample = 4 * 128 * 80 + 80
    per_behaviour = (2 * 128 * 80 + 80 + 2 * 128) + (4 * 80 + 2 * 80 * 40 + 40) + (4 * 40 + 2 * 40 + 1)
    assert per_behaviour == 27817
    fwd = floor.attention_cost(1024, 50_000, 128, (80, 40), "forward", 4)
    assert fwd.flops == 1024 * per_sample + 50_000 * per_behaviour
    params = (512 * 80 + 80) + (80 * 40 + 40) + (40 + 1)
    assert fwd.bytes == 4 * (50_000 * 128 + 2 * 1024 * 128 + params) + 8 * 1024
    bwd = floor.attention_cost(1024, 50_000, 128, (80, 40), "backward", 4)
    assert bwd.flops == 3 * fwd.flops  # 2x plus the recompute
    full = floor.attention_cost(1024, 50_000, 128, (80, 40), "full", 4)
    assert full.flops == fwd.flops + bwd.flops and full.bytes == fwd.bytes + bwd.bytes
    # Dice: two passes over x forward, 3 elements each
    d = floor.dice_cost(1000, 10, "forward", 2)
    assert d.bytes == 2 * 3 * 1000 * 10 + 4 * 30
    # MBA's cost has no K in it: 100 ids, 10 distinct rows of 8 floats
    m = floor.mba_cost(100, 10, 8, 4)
    assert (m.flops, m.bytes) == (4 * 10 * 8 + 10, 100 * 8 + 3 * 10 * 8 + 3 * 10 * 8 * 4)
    peaks = floor.Peaks("x", {"float32": 1e12}, 1e11)
    assert peaks.rate("bfloat16") == 1e12  # falls back to float32's rate
    with pytest.raises(ValueError):
        floor.floor_ms(m, 0.0, 1.0)


def test_quantiles():
    t = measure.quantiles([0.005, 0.001, 0.003, 0.002, 0.004])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.samples) == pytest.approx((3.0, 1.8, 4.2, 5))


def test_missing_provider_is_skipped_with_reason(monkeypatch):
    reason = cases.provider_unavailable_reason("attention", "cuda", CPU)
    assert reason and "cuda" in reason
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, skipped = cases.available_providers("dice", CPU, ("reference", "torch", "triton", "cuda"))
    assert "reference" in ok and "torch" in ok
    assert set(skipped) == {"triton", "cuda"} and all(skipped.values())
    # the runner records the skip as a row with its reason
    runner = _runner()
    runner.args.providers = ["torch", "cuda"]
    assert runner.providers_for("attention", {"B": 2, "T": 2, "D": 2}, torch.float32) == ["torch"]
    (row,) = [r for r in runner.rows if r["provider"] == "cuda"]
    assert row["status"] == "skipped" and row["reason"] == reason
    # a missing model class is named
    monkeypatch.setattr(cases, "_din_class", lambda: None)
    assert "din_kernels.DIN" in cases.provider_unavailable_reason("din_step", "torch", CPU)
    # a missing peer package is named
    real = cases.importlib.util.find_spec
    monkeypatch.setattr(cases.importlib.util, "find_spec", lambda n: None if n == "deepctr_torch" else real(n))
    assert "deepctr-torch" in cases.provider_unavailable_reason("attention", "deepctr_torch", CPU)


def test_triton_attention_sizes_beyond_shared_memory_are_skipped_with_reason():
    pytest.importorskip("triton")
    cuda = torch.device("cuda")  # the sm_90 limit when no GPU is here
    gpu = cases.SHAPE_SETS["gpu"]["attention"]
    wide = next(s for s in gpu if s["D"] == 256)
    reason = cases._triton_attention_refusal(wide, torch.float32, cuda)
    assert reason and "shared memory" in reason and "D = 256" in reason
    for shape in gpu:
        assert cases._triton_attention_refusal(shape, torch.bfloat16, cuda) is None
    assert cases._triton_attention_refusal(gpu[0], torch.float32, cuda) is None
    assert "float64" in cases._triton_attention_refusal(gpu[0], torch.float64, cuda)


def test_peers_compute_our_function():
    pytest.importorskip("deepctr_torch")
    from deepctr_torch.layers.activation import Dice as PeerDice
    from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer

    import din_kernels

    torch.manual_seed(0)
    ours = din_kernels.TargetAttention(8, (6, 4), "sigmoid", backend="reference")
    peer = AttentionSequencePoolingLayer(att_hidden_units=(6, 4), att_activation="sigmoid", embedding_dim=8)
    cases.copy_attention_weights(ours, peer)
    q, k, lengths = torch.randn(5, 8), torch.randn(5, 7, 8), torch.tensor([0, 1, 7, 3, 5])
    torch.testing.assert_close(peer(q[:, None], k, lengths[:, None])[:, 0], ours(q, k, lengths))
    dice = din_kernels.Dice(6, affine=True, backend="reference")
    with torch.no_grad():
        dice.alpha.uniform_(0, 1)
        dice.weight.uniform_(0.5, 1.5)
        dice.bias.uniform_(-0.5, 0.5)
    pdice = PeerDice(6, dim=2, epsilon=1e-8)
    cases.copy_dice_weights(dice, pdice)
    x = torch.randn(50, 6) * 2 + 1
    torch.testing.assert_close(pdice(x), dice(x), rtol=1e-4, atol=1e-5)


def test_workload_modes_run_tiny():
    """Every mode of the torch provider builds and runs on a tiny case (the shapes a run would use)."""
    for op, shape in (("attention", {"B": 3, "T": 4, "D": 4, "hidden": [4, 2]}), ("dice", {"N": 16, "C": 3}),
                      ("mba", {"K": 50, "B": 3, "L": 4, "D": 4})):
        wl = cases.build(op, "torch", shape, torch.float32, CPU)
        for mode in cases.MODES[op]:
            wl.setups[mode]()()
        wl.zero()
        assert cases.cost(op, shape, cases.MODES[op][-1], torch.float32, wl.info).flops > 0
    cases.clear_cache()


def _fake_rows():
    base = {"op": "attention", "B": 1024, "T": 100, "D": 128, "hidden": [80, 40], "activation": "sigmoid",
            "dtype": "float32", "mode": "full", "device": "Test CPU (2 threads)", "device_type": "cpu",
            "status": "ok", "floor_ms": 1.0, "torch": "2.x", "git": "abc1234", "timestamp": "2026-01-01T00:00:00+00:00",
            "peak_tflops_fp32": 0.1, "peak_gbps": 10.0}
    rows = []
    for provider, ms, mb in (("reference", 900.0, 800.0), ("torch", 100.0, 50.0), ("deepctr_torch", 400.0, 700.0)):
        rows.append({**base, "provider": provider, "median_ms": ms, "p20_ms": ms * 0.9, "p80_ms": ms * 1.1,
                     "peak_mem_mb": mb})
    rows.append({"op": "attention", "provider": "cuda", "status": "skipped", "reason": "no GPU here",
                 "dtype": "float32", "mode": None})
    return rows


def test_report_and_readme(tmp_path):
    rows = _fake_rows()
    for r in report.ok_rows(rows):
        report.check_row(r)
    head = report.headline_table(rows)
    assert "| torch | 100 |" in head and "4.00x" in head and "| 50.0 |" in head
    md = report.markdown(rows)
    assert "no GPU here" in md and "9.00x" in md
    path = tmp_path / "r.jsonl"
    report.write_jsonl(rows, str(path))
    assert report.read_jsonl(str(path)) == rows
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{readme_results.START}\nold\n{readme_results.END}\nafter\n")
    assert readme_results.main([str(path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "Test CPU" in text and "2026-01-01" in text and "4.00x" in text
    assert readme_results.main([str(path), "--readme", str(readme), "--check"]) == 0
    readme.write_text("# no markers\n")
    assert readme_results.main([str(path), "--readme", str(readme)]) == 1


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--ops", "nope"])
    args = bench_run.parse_args(["--providers", "torch,deepctr_torch", "--modes", "full"])
    assert args.providers == ["torch", "deepctr_torch"] and args.modes == ["full"]
    assert isinstance(args, argparse.Namespace)


# ------------------------------------------------------------------------------------------------------------ serve


def _serve_runner(tmp_path, monkeypatch, *argv):
    from benchmarks import serve

    # the package's export compiles for tens of seconds: test_serve_package covers it
    monkeypatch.setattr(serve, "package_reason", lambda: "left to test_serve_package")
    monkeypatch.setattr(floor, "measure_peaks", lambda device, dtypes=(torch.float32,), min_run_time=1.0: floor.Peaks(
        "Test CPU (1 threads)", {"float32": 2e10}, 5e9))  # the latency part's one-thread peaks, not measured
    monkeypatch.setitem(serve.SETS, "tiny", {"U": 3, "C": 4, "T": 5, "D": 8, "vocab": 200, "reference_U": 2,
                                             "latency_C": 4, "latency_s": 0.01, "sweep_U": 2, "sweep_C": [1, 3]})
    args = bench_run.parse_args(["--out", str(tmp_path), "--rounds", "1", "--min-run-time", "0.001",
                                 "--max-run-time", "0.01", "--min-samples", "1", "--no-memory", *argv])
    peaks = floor.Peaks(device="Test CPU (2 threads)", flops={"float32": 1e11}, bandwidth=1e10)
    return bench_run.Runner(args, CPU, [torch.float32], peaks), serve


def test_serve_section_rows(tmp_path, monkeypatch):
    """The serve section at a tiny size: every part's rows and fields, the providers that run here, the reasons of
    those that do not, the single thread of the latency part restored after, the tables and the sweep's plot."""
    import din_kernels
    from din_kernels import _extension

    runner, serve = _serve_runner(tmp_path, monkeypatch)
    threads = torch.get_num_threads()
    rows = serve.run(runner, "tiny")
    assert torch.get_num_threads() == threads
    assert rows == report.ok_rows(runner.rows)
    peer = importlib.util.find_spec("deepctr_torch") is not None
    ours = ["torch", *(["cpu"] if _extension.loaded() else [])]
    want = {
        "attention": {*(f"query_offsets_{b}" for b in [*ours, "reference"]), *(f"repeated_{b}" for b in ours)},
        "model": {*(f"rank_{b}" for b in ours), *(f"forward_repeated_{b}" for b in ours)},
    }
    for part in ("attention", "model"):
        want[part] |= {cases.PEER} if peer else set()
    want["latency"] = want["sweep"] = want["model"]
    for part in serve.PARTS:
        got = {r["provider"] for r in rows if r["part"] == part}
        assert want[part] <= got, (part, want[part] - got)
        assert got <= want[part] | {"package"}, (part, got - want[part])
    for r in rows:
        report.check_row(r)
        assert r["op"] == "serve" and r["mode"] == "forward" and r["dtype"] == "float32" and r["status"] == "ok"
        assert r["Nq"] == r["U"] * r["C"] and r["N"] == r["U"] * r["T"] and r["pairs"] == r["Nq"] * r["T"]
        assert r["users_per_s"] == pytest.approx(r["U"] / (r["median_ms"] / 1e3))
        assert r["candidates_per_s"] == pytest.approx(r["Nq"] / (r["median_ms"] / 1e3))
        assert r["floor_ms"] > 0 and r["flops"] > 0 and r["method"] in report.SERVE_METHODS
        assert r["peak_mem_mb"] is None  # --no-memory
    assert {r["C"] for r in rows if r["part"] == "sweep"} == {1, 3}
    assert {(r["U"], r["C"]) for r in rows if r["part"] == "latency"} == {(1, 4)}
    for r in (r for r in rows if r["part"] == "latency"):
        assert r["threads"] == 1 and r["p50_ms"] == r["median_ms"] and r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["samples"] >= serve.LATENCY_MIN and r["peak_rate_tflops"] == pytest.approx(0.02)
    attention = next(r for r in rows if r["part"] == "attention" and r["U"] == 3)
    assert {r["U"] for r in rows if r["part"] == "attention" and r["backend"] == "reference"} == {2}  # fewer users
    cost = floor.serve_attention_cost(3, 12, 15, 60, 8, (80, 40), 4)
    assert attention["floor_ms"] == pytest.approx(floor.floor_ms(cost, 1e11, 1e10))
    # what cannot run is a row with its reason
    skipped = {(r["part"], r["provider"]): r["reason"] for r in runner.rows if r.get("status") != "ok"}
    for part in ("attention", "model"):
        for b in ("triton", "cuda"):
            name = f"query_offsets_{b}" if part == "attention" else f"rank_{b}"
            assert skipped[(part, name)], (part, name)
    assert skipped[("model", "package")] == "left to test_serve_package"
    monkeypatch.undo()
    if not (callable(getattr(din_kernels, "export", None)) and callable(getattr(din_kernels, "load", None))):
        assert "not in this version of the package" in serve.package_reason()
    if not peer:
        assert "deepctr-torch" in skipped[("attention", cases.PEER)]
    # the tables and the plot
    md = report.markdown(runner.rows)
    assert "### serve" in md and "| attention U=3 C=4 | query_offsets_torch |" in md and "p99 ms" in md
    assert "| floor |" in md and "speed-up" in md or not peer
    pytest.importorskip("matplotlib")
    path = report.plot_serve_sweep(runner.rows, str(tmp_path / "sweep.png"))
    assert path and os.path.getsize(path) > 0


def test_serve_providers_filter_and_budget(tmp_path, monkeypatch):
    from din_kernels import _extension

    runner, serve = _serve_runner(tmp_path, monkeypatch, "--providers", "rank_torch,query_offsets")
    runner.deadline = 0.0  # the time budget is spent: only the first part runs
    runner.args.time_budget = 1.0
    rows = serve.run(runner, "tiny")
    assert {r["provider"] for r in rows} == {"query_offsets_torch", *(["query_offsets_cpu"] if _extension.loaded()
                                                                      else [])}
    assert {r["part"] for r in rows} == {"attention"}
    spent = [r for r in runner.rows if r.get("provider") == "all"]
    # the reference's case of fewer users, the model, the latency, the sweep's points
    assert [r["part"] for r in spent] == ["attention", "model", "latency", "sweep", "sweep"]
    assert all("budget" in r["reason"] for r in spent)


def test_serve_providers_compute_the_same_function():
    """rank == forward on the repeated batch on every backend here; the query_offsets op == the op on the repeated
    history == DeepCTR-Torch's layer on it (our weights copied); the peer DIN reads its lengths column."""
    from benchmarks import serve
    from din_kernels import _extension

    s = {"U": 3, "C": 4, "T": 5, "D": 8, "vocab": 200}
    ours = ["torch", *(["cpu"] if _extension.loaded() else [])]
    att = serve.shape_of("attention", s)
    outs = {b: cases.build("serve", f"{m}_{b}", att, torch.float32, CPU).setups["forward"]()()
            for m in ("query_offsets", "repeated") for b in ours}
    want = cases.build("serve", "query_offsets_reference", att, torch.float32, CPU).setups["forward"]()()
    assert want.shape == (12, 8)
    for got in outs.values():
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model = serve.shape_of("model", s)
    logits = [cases.build("serve", f"{m}_{b}", model, torch.float32, CPU).setups["forward"]()()
              for m in ("rank", "forward_repeated") for b in ours]
    assert logits[0].shape == (12,)
    for got in logits[1:]:
        torch.testing.assert_close(got, logits[0], rtol=1e-4, atol=1e-5)
    cases.clear_cache()
    if importlib.util.find_spec("deepctr_torch") is None:
        return
    peer = cases.build("serve", cases.PEER, att, torch.float32, CPU).setups["forward"]()()
    torch.testing.assert_close(peer, want, rtol=1e-4, atol=1e-5)
    shape = {"B": 3, "T": 5, "D": 8, "vocab": 200}
    batch, _, n_cate = cases._din_batch(shape, CPU, 0)
    peer_din = cases.peer_din_model(shape, n_cate, CPU)
    X = cases.peer_din_input(peer_din, batch)
    start, end = peer_din.feature_index["seq_length"]
    assert torch.equal(X[:, start], batch["hist_len"].float())
    start, end = peer_din.feature_index["hist_cate_id"]
    assert torch.equal(X[:, start:end], batch["hist"][..., 1].float())
    cases.clear_cache()


def test_serve_cli():
    args = bench_run.parse_args(["--ops", "serve,attention", "--providers", "rank_cpu,deepctr_torch,rank,cpu"])
    assert args.ops == ["serve", "attention"]
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--providers", "rank_nope"])
    # a name of the serve section leaves the other ops with the providers the list names of theirs
    runner = _runner()
    runner.args.providers = ["rank_cpu"]
    assert runner.providers_for("attention", {"B": 2, "T": 2, "D": 2}, torch.float32) == []


@pytest.mark.slow
def test_serve_package():
    """The exported package's provider (where din_kernels.export/load exist): rank's logits."""
    from benchmarks import serve

    reason = serve.package_reason()
    if reason is not None:
        pytest.skip(reason)
    shape = serve.shape_of("model", {"U": 3, "C": 4, "T": 5, "D": 8, "vocab": 200})
    wl = cases.build("serve", "package", shape, torch.float32, CPU)
    backend = serve._package_backend(CPU)
    want = cases.build("serve", f"rank_{backend}", shape, torch.float32, CPU).setups["forward"]()()
    torch.testing.assert_close(wl.setups["forward"]()(), want, rtol=1e-4, atol=1e-5)
    assert wl.info["export_s"] > 0
    serve._MODELS.clear()
    serve._PACKAGES.clear()
    cases.clear_cache()


def test_serve_memory_in_a_fresh_process(tmp_path, monkeypatch):
    runner, serve = _serve_runner(tmp_path, monkeypatch)
    shape = serve.shape_of("attention", serve.settings("tiny"))
    rows = [{**shape, "provider": name, "method": method, "backend": backend, "dtype": "float32"}
            for name, method, backend in (("repeated_torch", "repeated", "torch"),
                                          ("query_offsets_reference", "query_offsets", "reference"))]
    rows.append({**serve.shape_of("model", serve.settings("tiny")), "provider": "package", "method": "package",
                 "backend": "cpu", "dtype": "float32"})
    serve._memory(runner, rows)
    assert isinstance(rows[0]["peak_mem_mb"], float) and "mem_error" not in rows[0]
    assert "reference" in rows[1]["mem_error"] and "exported" in rows[2]["mem_error"]
