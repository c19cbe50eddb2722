"""Rewrites the results section of README.md from the JSON lines of a real run.

    python benchmarks/readme_results.py                      # every benchmarks/results/*-latest.jsonl
    python benchmarks/readme_results.py results/a.jsonl ...  # these runs (one section per device)
    python benchmarks/readme_results.py --check              # exit 1 when README.md is not up to date

Only the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` changes: for each device, its name, the
date, torch and git of the run, the headline table (CPU), one table per op (mode full; MBA forward) with each
provider's median time and its speed-up over the eager reference, and the serve section (users/s, latency, the
floor, the plot of throughput against the candidates per user when it is next to the JSON).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import defaultdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402
from benchmarks.cases import shape_label  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"
PROVIDER_ORDER = ("reference", "reference_compile", "torch", "cpu", "triton", "cuda", "deepctr_torch")


def pivot(rows: list[dict], op: str) -> str:
    """One op's headline mode as shape x provider: median ms and the speed-up over the reference."""
    mode = "forward" if op == "mba" else "full"
    rs = [r for r in report.ok_rows(rows) if r["op"] == op and r["mode"] == mode]
    if not rs:
        return ""
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in rs)]
    cells: dict = defaultdict(dict)
    for r in rs:
        cells[(shape_label(op, r), r["dtype"])][r["provider"]] = r
    what = {"attention": "forward+backward", "dice": "forward+backward (training)", "mba": "one update",
            "din_step": "one training step"}[op]
    lines = [f"**{op}** ({what}; median ms, speed-up over `reference`)", "",
             "| shape | dtype | " + " | ".join(f"`{p}`" for p in providers) + " | floor ms |",
             "| --- | --- | " + " | ".join("---:" for _ in providers) + " | ---: |"]
    for (label, dtype), by_p in cells.items():
        ref = by_p.get("reference", {}).get("median_ms")
        row = []
        for p in providers:
            r = by_p.get(p)
            if r is None:
                row.append("-")
            elif ref and p != "reference":
                row.append(f"{report.fmt_ms(r['median_ms'])} ({ref / r['median_ms']:.2f}x)")
            else:
                row.append(report.fmt_ms(r["median_ms"]))
        floor_ms = next(iter(by_p.values()))["floor_ms"]
        lines.append(f"| {label} | {dtype} | " + " | ".join(row) + f" | {floor_ms:.3g} |")
    return "\n".join(lines)


def section(rows: list[dict], source: str) -> str:
    """The markdown of one run (one device)."""
    okr = report.ok_rows(rows)
    if not okr:
        raise ValueError(f"{source} holds no measured row")
    first = okr[0]
    date = first.get("timestamp", "?")
    parts = [f"### {first['device']}",
             f"Measured {date} with torch {first.get('torch')}, git {first.get('git')}, "
             f"{first.get('threads', '?')} threads (`{os.path.relpath(source, ROOT)}`). "
             f"Device peaks measured in the same run: {first.get('peak_tflops_fp32', 0) * 1e3:.3g} GFLOP/s fp32 "
             f"matmul, {first.get('peak_gbps', 0):.3g} GB/s copy; `floor` = max(FLOPs / peak, bytes / bandwidth)."]
    head = report.headline_table(rows)
    if head:
        parts.append(head)
    mba = report.mba_k_table(rows)
    if mba:
        parts.append(mba.replace("### ", "**", 1).replace("\n", "**\n", 1))
    parts += [t for t in (pivot(rows, op) for op in ("attention", "dice", "mba", "din_step")) if t]
    serve = report.serve_markdown(rows, "**serve** (several candidates per user history: `query_offsets`, "
                                        "`DIN.rank`)")
    if serve:
        parts.append(serve)
        plot = source.removesuffix("-latest.jsonl") + "-serve-sweep.png"
        if plot != source and os.path.exists(plot):
            parts.append(f"![serve: throughput against the candidates per user]({os.path.relpath(plot, ROOT)})")
    return "\n\n".join(parts)


def render(paths: list[str]) -> str:
    body = "\n\n".join(section(report.read_jsonl(p), p) for p in paths)
    sources = ", ".join(os.path.basename(p) for p in paths)
    note = f"<!-- written by benchmarks/readme_results.py from {sources}; do not edit by hand -->"
    return f"{START}\n{note}\n\n{body}\n\n{END}"


def rewrite(text: str, new_section: str) -> str:
    """``text`` with everything from the start marker to the end marker replaced by ``new_section``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README.md needs the markers {START} and {END} (in this order) around the results section")
    return text[:start] + new_section + text[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="*",
                    help="results of benchmarks/run.py (default: benchmarks/results/*-latest.jsonl)")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--check", action="store_true", help="only say whether README.md is up to date")
    args = ap.parse_args(argv)
    paths = args.jsonl or sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*-latest.jsonl")))
    if not paths:
        print("no results: run `make bench` first (or name a .jsonl file)", file=sys.stderr)
        return 1
    with open(args.readme) as f:
        text = f.read()
    try:
        new = rewrite(text, render(paths))
    except ValueError as e:
        print(f"{args.readme}: {e}", file=sys.stderr)
        return 1
    if args.check:
        up_to_date = new == text
        print(f"{args.readme} is {'up to date' if up_to_date else 'out of date'}")
        return 0 if up_to_date else 1
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"{args.readme}: results section rewritten from {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
