"""The benchmark harness itself (benchmarks/): the row schema, the floor arithmetic, skipping what cannot run, the
peers computing our function, the report and the README rewrite. Fast: no benchmark is run."""

import argparse
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
