"""Results: JSON lines (the schema of DESIGN.md), the markdown tables and the plots, all drawn from the rows.

A row is one JSON object: ``status`` ``"ok"`` for a measurement (op, provider, mode, the shape's fields, dtype,
device, median_ms, p20_ms, p80_ms, peak_mem_mb, floor_ms, flops, bytes, torch, git, ...), ``"skipped"`` or
``"error"`` with a ``reason`` otherwise.

Redraw the tables and plots of a run: ``python benchmarks/report.py benchmarks/results/<file>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cases import HEADLINE, PEER, PROVIDERS, shape_label  # noqa: E402

REQUIRED = ("op", "provider", "mode", "dtype", "device", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "floor_ms",
            "torch", "git")
SHAPE_KEYS = {"attention": ("B", "T", "D", "hidden", "activation"), "dice": ("N", "C"),
              "mba": ("K", "B", "L", "D", "ids"), "din_step": ("B", "T", "D", "vocab"),
              "serve": ("part", "U", "C", "T", "D", "hidden", "activation")}
OPTIONAL_SHAPE_KEYS = {"ids"}  # MBA: the ids' range when narrower than the table (the same batch for every K)


def check_row(row: dict) -> None:
    """Raises ``ValueError`` naming what a measured row lacks (the fields of DESIGN.md's schema)."""
    missing = [k for k in REQUIRED if k not in row]
    missing += [k for k in SHAPE_KEYS.get(row.get("op"), ()) if k not in row and k not in OPTIONAL_SHAPE_KEYS]
    if missing:
        raise ValueError(f"row of {row.get('op')}/{row.get('provider')} lacks {missing}")
    for k in ("median_ms", "p20_ms", "p80_ms", "floor_ms"):
        if not isinstance(row[k], (int, float)) or row[k] < 0:
            raise ValueError(f"{k} must be a non-negative number, got {row[k]!r}")
    if not row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]:
        raise ValueError(f"p20 <= median <= p80 does not hold: {row['p20_ms']}, {row['median_ms']}, {row['p80_ms']}")


def write_jsonl(rows: Iterable[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ok_rows(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status", "ok") == "ok"]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(rows: list[dict]) -> str:
    """``cpu`` / ``cuda`` and the device's name, e.g. ``cpu-amd-epyc`` (threads left out)."""
    row = rows[0]
    name = re.sub(r"\s*\(\d+ threads\)", "", row.get("device", ""))
    return f"{row.get('device_type', 'cpu')}-{slug(name)}".strip("-")


def case_key(row: dict) -> tuple:
    return (row["op"], shape_label(row["op"], row), row["dtype"], row["mode"])


def fmt_ms(ms: float | None) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_mb(mb) -> str:
    if isinstance(mb, (int, float)) and not math.isnan(mb):
        return f"{mb:.1f}"
    return "-"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def _achieved(row: dict) -> str:
    """Achieved GFLOP/s and GB/s of the row's FLOP/byte model; the bandwidth also as a share of the measured copy."""
    gf, gb, peak = row.get("gflops"), row.get("gbps"), row.get("peak_gbps")
    if not isinstance(gf, (int, float)) or not isinstance(gb, (int, float)):
        return "-"
    share = f" ({100 * gb / peak:.0f}% of copy)" if peak else ""
    return f"{gf:.3g} GFLOP/s, {gb:.3g} GB/s{share}"


def headline_rows(rows: list[dict]) -> list[dict]:
    """The rows of the headline case (attention, B=1024 T=100 D=128, (80, 40) sigmoid, float32, full)."""
    h = HEADLINE
    out = []
    for r in ok_rows(rows):
        if r["op"] != h["op"] or r["mode"] != h["mode"] or r["dtype"] != h["dtype"]:
            continue
        if all(r.get(k) == v for k, v in h["shape"].items()):
            out.append(r)
    return out


def headline_table(rows: list[dict]) -> str:
    """The headline: every provider at the headline case, with its speed-up over DeepCTR-Torch and its peak
    memory (the subprocess RSS measurement on the CPU)."""
    hr = headline_rows(rows)
    if not hr:
        return ""
    peer = next((r for r in hr if r["provider"] == PEER), None)
    shape = HEADLINE["shape"]
    lines = [f"Headline: TargetAttention({shape['D']}, hidden={tuple(shape['hidden'])}, activation="
             f"\"{shape['activation']}\"), forward+backward, B={shape['B']}, T={shape['T']}, {HEADLINE['dtype']}, "
             f"{hr[0]['device']}", "",
             "| provider | median ms | p20-p80 ms | speed-up vs deepctr_torch | peak memory MB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    order = {p: i for i, p in enumerate(("torch", "cpu", "triton", "cuda", PEER, "reference", "reference_compile"))}
    for r in sorted(hr, key=lambda r: order.get(r["provider"], 99)):
        lines.append(f"| {r['provider']} | {fmt_ms(r['median_ms'])} | {fmt_ms(r['p20_ms'])}-{fmt_ms(r['p80_ms'])} "
                     f"| {_ratio(peer['median_ms'], r['median_ms']) if peer else '-'} | {_fmt_mb(r['peak_mem_mb'])} |")
    return "\n".join(lines)


def op_table(rows: list[dict], op: str) -> str:
    """One op's rows: time, speed-up over the eager reference, peak memory, the floor and the fraction of it."""
    rs = [r for r in ok_rows(rows) if r["op"] == op]
    if not rs:
        return ""
    ref = {case_key(r): r["median_ms"] for r in rs if r["provider"] == "reference"}
    lines = [f"### {op}", "",
             "| shape | dtype | mode | provider | median ms | p20-p80 ms | vs reference | peak MB | floor ms "
             "| % of floor | achieved |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rs:
        frac = f"{100 * r['floor_ms'] / r['median_ms']:.1f}%" if r["median_ms"] else "-"
        lines.append(f"| {shape_label(op, r)} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                     f"{fmt_ms(r['median_ms'])} | {fmt_ms(r['p20_ms'])}-{fmt_ms(r['p80_ms'])} | "
                     f"{_ratio(ref.get(case_key(r)), r['median_ms'])} | {_fmt_mb(r['peak_mem_mb'])} | "
                     f"{r['floor_ms']:.3g} | {frac} | {_achieved(r)} |")
    return "\n".join(lines)


def skipped_table(rows: list[dict]) -> str:
    seen, lines = set(), []
    for r in rows:
        if r.get("status") in ("skipped", "error"):
            key = (r.get("op"), r.get("provider"), r.get("dtype"), r.get("mode"), r["reason"])
            if key in seen:
                continue
            seen.add(key)
            where = " ".join(str(x) for x in (r.get("op"), r.get("dtype"), r.get("mode")) if x)
            lines.append(f"- {r['status']}: {r.get('provider')} ({where}): {r['reason']}")
    return "\n".join(["### Not measured", "", *lines]) if lines else ""


def mba_k_table(rows: list[dict]) -> str:
    """MBA time against the table size K: the same batch (ids drawn from one range, ``ids``) at every K, and ids
    drawn over the whole table. The torch path's cost should follow the batch's distinct rows, not K."""
    rs = [r for r in ok_rows(rows) if r["op"] == "mba"]
    groups = defaultdict(dict)
    for r in rs:
        ids = f"ids < {r['ids']:.0e} (same batch)" if r.get("ids") else "ids over the table"
        groups[(r["provider"], r["dtype"], r["B"], r["L"], r["D"], ids)][r["K"]] = (r["median_ms"], r.get("U"))
    ks = sorted({r["K"] for r in rs})
    if len(ks) < 2:
        return ""
    lines = ["### MBA cost against the table size K", "", "U: the batch's distinct ids (rows read and written).", "",
             "| provider | dtype | batch | ids | " + " | ".join(f"K={k:.0e} ms" for k in ks)
             + f" | K={ks[-1]:.0e} / K={ks[0]:.0e} |",
             "| --- | --- | --- | --- | " + " | ".join("---:" for _ in ks) + " | ---: |"]
    for (p, dt, B, L, D, ids), by_k in sorted(groups.items()):
        cells = " | ".join(f"{fmt_ms(by_k[k][0])} (U={by_k[k][1]})" if k in by_k else "-" for k in ks)
        last, first = by_k.get(ks[-1], (None,))[0], by_k.get(ks[0], (None,))[0]
        lines.append(f"| {p} | {dt} | B={B} L={L} D={D} | {ids} | {cells} | {_ratio(last, first)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- serve

SERVE_METHODS = ("query_offsets", "rank", "package", "repeated", "forward_repeated", PEER)
SERVE_BACKENDS = ("cuda", "triton", "cpu", "torch", "reference", None)


def serve_rows(rows: list[dict], part: str) -> list[dict]:
    """The measured rows of one part of the serve section, ours first (by method, then backend), the peer last."""
    rs = [r for r in ok_rows(rows) if r.get("op") == "serve" and r.get("part") == part]

    def key(r):
        m, b = r.get("method"), r.get("backend")
        return (SERVE_METHODS.index(m) if m in SERVE_METHODS else 99,
                SERVE_BACKENDS.index(b) if b in SERVE_BACKENDS else 99)

    return sorted(rs, key=key)


def _same_case(a: dict, b: dict) -> bool:
    return (a.get("U"), a.get("C")) == (b.get("U"), b.get("C"))


def serve_baseline(row: dict, rs: list[dict]) -> dict | None:
    """The row ``row`` is compared with on the same backend and sizes: the repeat for ``query_offsets``/``rank``,
    the eager ``rank`` for the package."""
    other = {"query_offsets": "repeated", "rank": "forward_repeated", "package": "rank"}.get(row.get("method"))
    return next((r for r in rs if r.get("method") == other and r.get("backend") == row.get("backend")
                 and _same_case(r, row)), None)


def _rate(x) -> str:
    if not isinstance(x, (int, float)) or math.isnan(x):
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _x_floor(ms: float, row: dict) -> str:
    """``ms`` as a multiple of the row's floor."""
    return f"{ms / row['floor_ms']:.2f}x" if row.get("floor_ms") else "-"


def _peer(rs: list[dict], row: dict) -> dict | None:
    """The peer's row of ``row``'s sizes."""
    return next((r for r in rs if r.get("method") == PEER and _same_case(r, row)), None)


def _best(rs: list[dict], method: str) -> dict | None:
    ours = [r for r in rs if r.get("method") == method and r.get("backend") != "reference"]
    return min(ours, key=lambda r: r["median_ms"]) if ours else None


def serve_summary(rows: list[dict]) -> str:
    """One line per goal of the section, from its rows: the fastest of our backends against the peer, the repeat,
    the floor; the package against eager ``rank``; the latency of one user."""
    lines = []
    att, model = serve_rows(rows, "attention"), serve_rows(rows, "model")
    best = _best(att, "query_offsets")
    if best:
        r, peer = best, _peer(att, best)
        parts = [f"attention, U={r['U']} users x C={r['C']} candidates, T={r['T']}, D={r['D']}: "
                 f"`{r['provider']}` {fmt_ms(r['median_ms'])} ms ({_rate(r['users_per_s'])} users/s)"]
        if peer:
            parts.append(f"speed-up {peer['median_ms'] / r['median_ms']:.1f}x over `{PEER}` on the repeated history")
        base = serve_baseline(r, att)
        if base:
            parts.append(f"{base['median_ms'] / r['median_ms']:.1f}x over `{base['provider']}`")
        if r.get("floor_ms"):
            parts.append(f"{r['median_ms'] / r['floor_ms']:.2f}x its floor ({r['floor_ms']:.3g} ms at "
                         f"{1e3 * r.get('peak_rate_tflops', 0):.3g} GFLOP/s)")
        lines.append("- " + ", ".join(parts))
    best = _best(model, "rank")
    if best:
        r, peer = best, _peer(model, best)
        parts = [f"whole model: `{r['provider']}` {_rate(r['users_per_s'])} users/s "
                 f"({_rate(r['candidates_per_s'])} candidates/s)"]
        if peer:
            parts.append(f"{r['users_per_s'] / peer['users_per_s']:.1f}x the users/s of `{PEER}`'s DIN on the "
                         "repeated batch")
        base = serve_baseline(r, model)
        if base:
            parts.append(f"{r['users_per_s'] / base['users_per_s']:.1f}x `{base['provider']}`")
        lines.append("- " + ", ".join(parts))
    pkg = next((r for r in model if r.get("method") == "package"), None)
    if pkg:
        base = serve_baseline(pkg, model)
        if base:
            export = f", exported in {pkg['export_s']:.0f} s" if isinstance(pkg.get("export_s"), (int, float)) else ""
            lines.append(f"- the exported package: {fmt_ms(pkg['median_ms'])} ms, "
                         f"{base['median_ms'] / pkg['median_ms']:.2f}x the speed of eager `{base['provider']}`{export}")
    lat = serve_rows(rows, "latency")
    best = _best(lat, "rank")
    if best:
        lines.append(f"- latency, one user x {best['C']} candidates, 1 thread: `{best['provider']}` p50 "
                     f"{fmt_ms(best['p50_ms'])} ms, p99 {fmt_ms(best['p99_ms'])} ms ({best['samples']} calls)")
    return "\n".join(lines)


def serve_throughput_table(rows: list[dict]) -> str:
    """The attention and model parts: users/s and candidates/s, against the peer, the repeat and the floor."""
    out = []
    for part in ("attention", "model"):
        rs = serve_rows(rows, part)
        if not rs:
            continue
        if not out:
            out += ["| part | provider | users/s | candidates/s | median ms | p20-p80 ms | vs deepctr_torch "
                    "| vs baseline | floor ms | x floor | peak MB |",
                    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rs:
            base, peer = serve_baseline(r, rs), _peer(rs, r)
            vs_base = f"{_ratio(base['median_ms'], r['median_ms'])} (`{base['provider']}`)" if base else "-"
            out.append(f"| {part} U={r['U']} C={r['C']} | {r['provider']} | {_rate(r['users_per_s'])} | "
                       f"{_rate(r['candidates_per_s'])} | {fmt_ms(r['median_ms'])} | "
                       f"{fmt_ms(r['p20_ms'])}-{fmt_ms(r['p80_ms'])} | "
                       f"{_ratio(peer['median_ms'], r['median_ms']) if peer else '-'} | {vs_base} | "
                       f"{r['floor_ms']:.3g} | {_x_floor(r['median_ms'], r)} | {_fmt_mb(r.get('peak_mem_mb'))} |")
    return "\n".join(out)


def serve_latency_table(rows: list[dict]) -> str:
    """The latency part: p50/p99 of one user's candidates, one call at a time, one thread."""
    rs = serve_rows(rows, "latency")
    if not rs:
        return ""
    lines = ["| provider | p50 ms | p99 ms | max ms | calls | floor ms (1 thread) | p50 / floor "
             "| p50 vs deepctr_torch |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rs:
        peer = _peer(rs, r)
        lines.append(f"| {r['provider']} | {fmt_ms(r['p50_ms'])} | {fmt_ms(r['p99_ms'])} | {fmt_ms(r.get('max_ms'))} "
                     f"| {r['samples']} | {r['floor_ms']:.3g} | {_x_floor(r['p50_ms'], r)} | "
                     f"{_ratio(peer['p50_ms'], r['p50_ms']) if peer else '-'} |")
    return "\n".join(lines)


def serve_sweep_table(rows: list[dict]) -> str:
    """The sweep: candidates/s of each provider against the candidates per user, and the floor's."""
    rs = serve_rows(rows, "sweep")
    if not rs:
        return ""
    cs = sorted({r["C"] for r in rs})
    by: dict = defaultdict(dict)
    floors = {}
    for r in rs:
        by[r["provider"]][r["C"]] = r
        floors[r["C"]] = r["Nq"] / (r["floor_ms"] / 1e3) if r.get("floor_ms") else float("nan")
    lines = ["| provider | " + " | ".join(f"C={c}" for c in cs) + " |",
             "| --- | " + " | ".join("---:" for _ in cs) + " |"]
    for p, by_c in by.items():
        lines.append(f"| {p} | " + " | ".join(_rate(by_c[c]["candidates_per_s"]) if c in by_c else "-" for c in cs)
                     + " |")
    lines.append("| floor | " + " | ".join(_rate(floors.get(c)) for c in cs) + " |")
    return "\n".join(lines)


def serve_markdown(rows: list[dict], title: str = "### serve") -> str:
    """The serve section under ``title``: the summary, the throughput, latency and sweep tables."""
    through = serve_throughput_table(rows)
    if not through and not serve_rows(rows, "latency") and not serve_rows(rows, "sweep"):
        return ""
    any_row = next(r for r in ok_rows(rows) if r.get("op") == "serve")
    about = (f"Users with T={any_row['T']} behaviours, D={any_row['D']} (two item fields), attention "
             f"{tuple(any_row['hidden'])} {any_row['activation']}, MLP {tuple(any_row.get('mlp') or (200, 80))}; "
             "float32 inference. `query_offsets_*` / `rank_*`: each history once per user; `repeated_*` / "
             "`forward_repeated_*` / `deepctr_torch`: the history repeated once per candidate (built in the timed "
             "call). `vs baseline`: over the same backend's repeat (the package: over eager `rank`). `x floor`: "
             "median / floor (FLOPs of every candidate-behaviour pair, the history read once per user; below 1: "
             "faster than the run's measured matmul peak predicts).")
    parts = [title, about, serve_summary(rows), through]
    lat = serve_latency_table(rows)
    if lat:
        r = serve_rows(rows, "latency")[0]
        parts += [f"Latency: one user x {r['C']} candidates, one call at a time, `torch.set_num_threads(1)`.", lat]
    sweep = serve_sweep_table(rows)
    if sweep:
        r = serve_rows(rows, "sweep")[0]
        parts += [f"Candidates/s against the candidates per user (U={r['U']} users).", sweep]
    return "\n\n".join(p for p in parts if p)


def markdown(rows: list[dict], meta: dict | None = None) -> str:
    """The whole report: header, headline, MBA-vs-K, one table per op, what was not measured."""
    okr = ok_rows(rows)
    meta = meta or {}
    first = okr[0] if okr else (rows[0] if rows else {})
    head = [f"## Benchmarks: {first.get('device', '?')}", "",
            f"{meta.get('date', first.get('timestamp', ''))}, torch {first.get('torch', '?')}, "
            f"git {first.get('git', '?')}, {first.get('threads', '?')} threads"]
    if first.get("peak_gbps"):
        head.append(f"measured peaks: {first.get('peak_tflops_fp32', float('nan')):.3g} TFLOP/s fp32 matmul, "
                    f"{first['peak_gbps']:.3g} GB/s copy; floor_ms = max(FLOPs / peak, bytes / bandwidth)")
    if meta.get("command"):
        head.append(f"command: `{meta['command']}`")
    parts = ["\n".join(head), headline_table(rows), mba_k_table(rows)]
    parts += [op_table(rows, op) for op in ("attention", "dice", "mba", "din_step")]
    parts.append(serve_markdown(rows))
    parts.append(skipped_table(rows))
    return "\n\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------------------------------------------- plots


def _color(provider: str):
    """One colour per provider in every plot."""
    import matplotlib

    return matplotlib.colormaps["tab10"](PROVIDERS.index(provider) if provider in PROVIDERS else 9)


def _last_mode(op: str) -> str:
    return {"mba": "forward"}.get(op, "full")


def plot_speedup(rows: list[dict], path: str) -> str | None:
    """Speed-up over the eager reference per shape, one panel per op (mode full; MBA forward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    okr = ok_rows(rows)
    ops = [op for op in ("attention", "dice", "mba", "din_step") if any(r["op"] == op for r in okr)]
    if not ops:
        return None
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rs = [r for r in okr if r["op"] == op and r["mode"] == _last_mode(op)]
        ref = {case_key(r): r["median_ms"] for r in rs if r["provider"] == "reference"}
        cases_ = sorted({(shape_label(op, r), r["dtype"]) for r in rs if case_key(r) in ref},
                        key=lambda c: [int(x.split("=")[1]) for x in c[0].split()] + [c[1]])
        providers = sorted({r["provider"] for r in rs if r["provider"] != "reference"})
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            ys = []
            for label, dt in cases_:
                r = next((r for r in rs if r["provider"] == p and shape_label(op, r) == label and r["dtype"] == dt),
                         None)
                ys.append(ref[(op, label, dt, _last_mode(op))] / r["median_ms"] if r and r["median_ms"] else 0)
            ax.bar([j + i * width for j in range(len(cases_))], ys, width, label=p, color=_color(p))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases_))])
        ax.set_xticklabels([f"{label}\n{dt}" for label, dt in cases_], fontsize=7)
        ax.set_ylabel("x faster than reference")
        ax.set_title(f"{op} ({_last_mode(op)})", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(f"Speed-up over the eager reference: {okr[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time_vs_t(rows: list[dict], path: str) -> str | None:
    """Attention time against the history length T at fixed (B, D, dtype) (mode full), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in ok_rows(rows) if r["op"] == "attention" and r["mode"] == "full"]
    groups = defaultdict(list)
    for r in rs:
        groups[(r["B"], r["D"], r["dtype"])].append(r)
    groups = {k: v for k, v in groups.items() if len({r["T"] for r in v}) >= 2}
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, ((B, D, dt), grs) in zip(axes[0], sorted(groups.items())):
        for p in sorted({r["provider"] for r in grs}):
            pts = sorted((r["T"], r["median_ms"]) for r in grs if r["provider"] == p)
            ax.plot([t for t, _ in pts], [m for _, m in pts], marker="o", label=p, color=_color(p))
        floor_pts = sorted({(r["T"], r["floor_ms"]) for r in grs})
        ax.plot([t for t, _ in floor_pts], [f for _, f in floor_pts], "k--", lw=0.8, label="floor")
        ax.set_xlabel("T (history length)")
        ax.set_ylabel("ms per forward+backward")
        ax.set_yscale("log")
        ax.set_title(f"B={B} D={D} {dt}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Target attention, time against T: {rs[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_serve_sweep(rows: list[dict], path: str) -> str | None:
    """The serve sweep: candidates/s and users/s against the candidates per user, one line per provider (colour by
    method, line style by backend), the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = serve_rows(rows, "sweep")
    if len({r["C"] for r in rs}) < 2:
        return None
    styles = {"cpu": "-", "cuda": "-", "triton": "-.", "torch": "--", None: ":"}
    cmap = matplotlib.colormaps["tab10"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    providers = list(dict.fromkeys(r["provider"] for r in rs))
    for key, ax, label in (("candidates_per_s", axes[0], "candidates/s"), ("users_per_s", axes[1], "users/s")):
        for p in providers:
            pts = sorted((r["C"], r[key]) for r in rs if r["provider"] == p)
            r0 = next(r for r in rs if r["provider"] == p)
            m = r0.get("method")
            ax.plot([c for c, _ in pts], [y for _, y in pts], marker="o", label=p,
                    color=cmap(SERVE_METHODS.index(m) if m in SERVE_METHODS else 9),
                    linestyle=styles.get(r0.get("backend"), "-"))
        floor_pts = sorted({(r["C"], r["Nq"] / (r["floor_ms"] / 1e3) * (1 if key == "candidates_per_s" else
                                                                         r["U"] / r["Nq"]))
                            for r in rs if r.get("floor_ms")})
        if floor_pts:
            ax.plot([c for c, _ in floor_pts], [y for _, y in floor_pts], "k--", lw=0.8, label="floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("candidates per user")
        ax.set_ylabel(label)
        ax.grid(True, which="both", lw=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    r = rs[0]
    fig.suptitle(f"Serving: throughput against the candidates per user (U={r['U']} users, T={r['T']}, D={r['D']}): "
                 f"{r['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(rows: list[dict], out_dir: str, meta: dict | None = None, plots: bool = True,
                  stem: str | None = None) -> dict[str, str]:
    """Writes ``<stem>-latest.md`` and the plots next to the JSON; returns ``{kind: path}``."""
    stem = stem or device_slug(ok_rows(rows) or rows)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    md = markdown(rows, meta)
    paths["md"] = os.path.join(out_dir, f"{stem}-latest.md")
    with open(paths["md"], "w") as f:
        f.write(md)
    if plots and ok_rows(rows):
        for kind, fn in (("speedup", plot_speedup), ("time_vs_t", plot_time_vs_t),
                         ("serve_sweep", plot_serve_sweep)):
            try:
                p = fn(rows, os.path.join(out_dir, f"{stem}-{kind.replace('_', '-')}.png"))
            except Exception as e:  # noqa: BLE001 - a plot never loses the results
                print(f"plot {kind} failed: {type(e).__name__}: {e}", file=sys.stderr)
                p = None
            if p:
                paths[kind] = p
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+", help="results file(s) of benchmarks/run.py")
    ap.add_argument("--out", help="folder of the markdown and plots (default: the first file's)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    rows = [r for p in args.jsonl for r in read_jsonl(p)]
    paths = write_reports(rows, args.out or os.path.dirname(os.path.abspath(args.jsonl[0])), plots=not args.no_plots)
    print(markdown(rows))
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
