"""The ``make bench`` runner: every provider of every op side by side in one process, on the machine it runs on.

    python benchmarks/run.py                 # the default CPU set (about 7 minutes on 2 shared cores)
    python benchmarks/run.py --full          # adds the production sizes
    python benchmarks/run.py --device cuda   # the GPU set (benchmarks/gpu_check.sh)
    python benchmarks/run.py --ops attention --shapes quick --providers torch,deepctr_torch
    python benchmarks/run.py --ops serve     # the serving section alone (benchmarks/serve.py)

Providers: ``reference`` (eager), ``reference_compile``, the package's backends that
:mod:`din_kernels.backend` says can run here (``torch``, ``cpu``, ``triton``, ``cuda``), and the peer
``deepctr_torch``; each one that cannot run is skipped with its reason, printed and recorded. Every row carries
its median, p20 and p80 time, its peak memory and its floor (:mod:`benchmarks.floor`, from peaks measured at the
start of the run). The rows go to ``benchmarks/results/<device>-<time>.jsonl`` (and ``<device>-latest.jsonl``), the
tables to ``<device>-latest.md`` (also printed), the plots next to them. On the CPU the headline row is always
measured: forward+backward of ``TargetAttention(128, hidden=(80, 40), activation="sigmoid")`` at B=1024, T=100,
the torch backend against DeepCTR-Torch. The ``serve`` section (:mod:`benchmarks.serve`) scores many candidates per
user history: users/s, candidates/s, p50/p99 latency and the floor, and a sweep over the candidates per user.

Ops are timed with the value checks of lengths/offsets switched off (``din_kernels.set_checks(False)``), as a
production caller would run them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import time

# On a CPU shared with other processes, OpenMP threads that spin at each barrier turn every parallel region into a
# wait for the scheduler (a 1 ms op measured at 100+ ms); sleeping waits keep the timings meaningful. Set before
# torch is imported; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make the repository root (benchmarks/, and din_kernels/ when it is
    sys.path.insert(0, ROOT)  # not installed) importable

import torch  # noqa: E402

import din_kernels  # noqa: E402
from benchmarks import cases, floor, measure, report, serve  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
# shares of --time-budget by op (cumulative: time an op leaves unused passes on to the next)
BUDGET_WEIGHTS = {"attention": 0.5, "dice": 0.2, "mba": 0.15, "din_step": 0.15, "serve": 0.2}
# the ops of a run: the cases of benchmarks/cases.py, then the serving section (benchmarks/serve.py)
ALL_OPS = (*cases.OPS, "serve")


def git_commit() -> str:
    """The short commit of the working tree (``-dirty`` when it has changes), or ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


class Runner:
    """Measures the cases of one run and collects the rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtypes: list[torch.dtype], peaks: floor.Peaks):
        self.args, self.device, self.dtypes, self.peaks = args, device, dtypes, peaks
        self.rows: list[dict] = []
        self.printed: set = set()
        self.stream = None  # a file the rows are appended to as they come (a killed run keeps its rows)
        self.started = time.perf_counter()
        self.deadline = None  # set per op by run_op under a time budget
        self.meta = {
            "device": peaks.device, "device_type": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": _triton_version(), "din_kernels": din_kernels.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "git": git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "peak_tflops_fp32": peaks.flops.get("float32", 0.0) / 1e12, "peak_gbps": peaks.bandwidth / 1e9,
        }

    # ------------------------------------------------------------------------------------------------ rows
    def _base(self, op: str, provider: str, shape: dict, dtype: torch.dtype, mode: str | None) -> dict:
        row = {"op": op, "provider": provider, "mode": mode}
        row.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in shape.items()})
        row.update({"dtype": cases.dtype_name(dtype), "device": self.meta["device"],
                    "device_type": self.meta["device_type"]})
        return row

    def skip(self, op, provider, shape, dtype, reason, status="skipped", mode=None) -> None:
        row = self._base(op, provider, shape, dtype, mode)
        row.update({"status": status, "reason": reason, "torch": self.meta["torch"], "git": self.meta["git"]})
        self._append(row)
        key = (op, provider, reason)
        if key not in self.printed:
            self.printed.add(key)
            print(f"  {status}: {op} {provider}: {reason}", flush=True)

    def add(self, op, provider, shape, dtype, mode, timing: measure.Timing, info: dict, peak_mb) -> dict:
        cost = cases.cost(op, shape, mode, dtype, info)
        dname = cases.dtype_name(dtype)
        row = self._base(op, provider, shape, dtype, mode)
        row.update(info)
        row.update({
            "status": "ok", "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
            "samples": timing.samples, "peak_mem_mb": peak_mb,
            "mem_method": "cuda_max_allocated" if self.device.type == "cuda" else "rss_hwm_subprocess",
            "floor_ms": self.peaks.floor_ms(cost, dname), "flops": cost.flops, "bytes": cost.bytes,
            "gflops": floor.gflops(cost, timing.median_ms), "gbps": floor.gbps(cost, timing.median_ms),
            "peak_rate_tflops": self.peaks.rate(dname) / 1e12,
        })
        row.update({k: v for k, v in self.meta.items() if k not in row})
        row["checks"] = din_kernels.checks_enabled()
        self._append(row)
        frac = 100 * row["floor_ms"] / timing.median_ms if timing.median_ms else float("nan")
        print(f"  {op:9s} {cases.shape_label(op, shape):26s} {dname:8s} {mode:8s} {provider:18s} "
              f"{timing.median_ms:10.3f} ms  [{timing.p20_ms:.3f}-{timing.p80_ms:.3f}]  floor {row['floor_ms']:.3f} ms"
              f" ({frac:.0f}%)", flush=True)
        return row

    def _append(self, row: dict) -> None:
        self.rows.append(row)
        if self.stream is not None:
            self.stream.write(json.dumps(row) + "\n")
            self.stream.flush()

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    # --------------------------------------------------------------------------------------------- measure
    def providers_for(self, op, shape, dtype) -> list[str]:
        wanted = cases.PROVIDERS
        if self.args.providers:  # names of the serve section's providers are not this op's
            wanted = [p for p in self.args.providers if p in cases.PROVIDERS]
        ok, skipped = cases.available_providers(op, self.device, wanted, dtype, shape, self.args.full)
        for p, reason in skipped.items():
            self.skip(op, p, shape, dtype, reason)
        return ok

    def measure_case(self, op: str, shape: dict, dtype: torch.dtype, providers: list[str]) -> None:
        """Times every provider of one case, mode by mode (interleaved on the CPU); GPU memory in-process."""
        workloads = {}
        for p in providers:
            try:
                workloads[p] = cases.build(op, p, shape, dtype, self.device, self.args.seed)
            except Exception as e:  # noqa: BLE001 - a provider that fails to build is reported, the rest go on
                self.skip(op, p, shape, dtype, measure.format_exception(e), status="error")
        modes = [m for m in cases.MODES[op] if not self.args.modes or m in self.args.modes]
        for mode in modes:
            live = {p: wl for p, wl in workloads.items() if mode in wl.setups}
            if self.device.type == "cuda":
                results = {}
                for p, wl in live.items():
                    try:
                        run = wl.setups[mode]()
                        results[p] = (measure.time_cuda(run, rep_ms=self.args.rep_ms),
                                      measure.cuda_peak_mb(run, wl.zero))
                        del run
                    except Exception as e:  # noqa: BLE001
                        results[p] = e
                    wl.zero()
            else:
                timed = measure.time_interleaved({p: wl.setups[mode] for p, wl in live.items()},
                                                 rounds=self.args.rounds, min_run_time=self.args.min_run_time,
                                                 min_samples=self.args.min_samples,
                                                 max_run_time=self.args.max_run_time,
                                                 resetup=mode == "backward")
                results = {p: t if isinstance(t, Exception) else (t, None) for p, t in timed.items()}
                for wl in live.values():
                    wl.zero()
            for p in live:
                res = results[p]
                if isinstance(res, Exception):
                    self.skip(op, p, shape, dtype, measure.format_exception(res), status="error", mode=mode)
                else:
                    self.add(op, p, shape, dtype, mode, res[0], live[p].info, res[1])
        del workloads
        cases.clear_cache()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def cpu_memory(self, op: str) -> None:
        """Fills ``peak_mem_mb`` of the op's CPU rows: one fresh process per provider (see :mod:`measure`)."""
        rows = [r for r in self.rows if r["op"] == op and r.get("status") == "ok" and r["peak_mem_mb"] is None]
        by_provider: dict[str, dict] = {}
        for r in rows:
            shape = {k: r[k] for k in report.SHAPE_KEYS[op] if k in r}
            key = json.dumps([shape, r["dtype"]])
            item = by_provider.setdefault(r["provider"], {}).setdefault(key, (key, shape, r["dtype"], []))
            item[3].append(r["mode"])
        for provider, items in by_provider.items():
            start = time.perf_counter()
            result = measure.cpu_peaks_in_subprocess(op, provider, list(items.values()), self.args.seed,
                                                     timeout=self.args.mem_timeout)
            for r in rows:
                if r["provider"] != provider:
                    continue
                shape = {k: r[k] for k in report.SHAPE_KEYS[op] if k in r}
                value = result.get(json.dumps([shape, r["dtype"]]), {}).get(r["mode"])
                if isinstance(value, (int, float)):
                    r["peak_mem_mb"] = value
                else:
                    r["mem_error"] = value or "not measured"
            print(f"  memory {op} {provider}: {time.perf_counter() - start:.1f} s", flush=True)

    def run_op(self, op: str, shapes: list[dict], budget_share: float = 1.0) -> None:
        """Measures every shape and dtype of ``op``; under ``--time-budget``, no case but the op's first starts
        once the op's cumulative share of the budget (``budget_share``, 0..1) is spent, so every op gets its turn."""
        if self.args.time_budget:
            self.deadline = self.started + self.args.time_budget * budget_share
        print(f"[{op}]", flush=True)
        first = True
        for shape in shapes:
            for dtype in self.dtypes:
                if self.out_of_time() and not first:
                    self.skip(op, "all", shape, dtype, f"the run's time budget ({self.args.time_budget:.0f} s, "
                                                       f"{op}'s share of it) was spent before this case")
                    continue
                first = False
                providers = self.providers_for(op, shape, dtype)
                if providers:
                    self.measure_case(op, shape, dtype, providers)
        if self.device.type == "cpu" and not self.args.no_memory:
            self.cpu_memory(op)

    def ensure_headline(self) -> None:
        """On the CPU, the headline rows (torch and deepctr_torch) are measured whatever the filters said."""
        if self.device.type != "cpu":
            return
        have = {r["provider"] for r in report.headline_rows(self.rows)}
        missing = [p for p in cases.HEADLINE["providers"] if p not in have]
        if not missing:
            return
        shape, dtype = dict(cases.HEADLINE["shape"]), cases.to_dtype(cases.HEADLINE["dtype"])
        providers = [p for p in missing if cases.provider_unavailable_reason("attention", p, self.device) is None]
        for p in set(missing) - set(providers):
            self.skip("attention", p, shape, dtype, cases.provider_unavailable_reason("attention", p, self.device))
        if not providers:
            return
        print("[headline]", flush=True)
        modes, self.args.modes = self.args.modes, [cases.HEADLINE["mode"]]
        try:
            self.measure_case("attention", shape, dtype, providers)
        finally:
            self.args.modes = modes
        if not self.args.no_memory:
            self.cpu_memory("attention")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present, else cpu)")
    ap.add_argument("--shapes", default=None, choices=sorted(cases.SHAPE_SETS),
                    help="shape set (default: 'default' on the CPU, 'gpu' on a GPU)")
    ap.add_argument("--full", action="store_true", help="the production shape set (and the compile of the DIN model)")
    ap.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(ALL_OPS)}")
    ap.add_argument("--providers", default=None,
                    help=f"comma-separated subset of {','.join(cases.PROVIDERS)} (serve: its providers, methods or "
                         "backends, e.g. rank_cpu, rank, cpu)")
    ap.add_argument("--modes", default=None, help="comma-separated subset of forward,backward,full")
    ap.add_argument("--dtypes", default=None, help="e.g. float32,bfloat16 (default: fp32, and bf16 where native)")
    ap.add_argument("--shrink", type=int, default=1,
                    help="divide B, N and K (serve: the numbers of users) by this (a dry run of a large set)")
    ap.add_argument("--out", default=RESULTS, help="results folder (default: benchmarks/results)")
    ap.add_argument("--stem", default=None, help="file name stem (default: the device, e.g. cpu-amd-epyc)")
    ap.add_argument("--no-history", action="store_true", help="write only <stem>-latest.jsonl, no timestamped copy")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--no-headline", action="store_true", help="development only: leave out the CPU headline rows")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="CPU: interleaved timing rounds per row")
    ap.add_argument("--min-run-time", type=float, default=0.3, help="CPU: seconds of timing per row at least")
    ap.add_argument("--min-samples", type=int, default=5, help="CPU: samples per row wanted")
    ap.add_argument("--max-run-time", type=float, default=2.0, help="CPU: seconds of timing per row at most")
    ap.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench repetition time (ms)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds after which no new case starts (the rest is recorded as skipped)")
    ap.add_argument("--mem-timeout", type=float, default=600.0, help="CPU: seconds per memory process at most")
    args = ap.parse_args(argv)
    for name in ("ops", "providers", "modes", "dtypes"):
        value = getattr(args, name)
        setattr(args, name, [v.strip() for v in value.split(",") if v.strip()] if value else None)
    for op in args.ops or ():
        if op not in ALL_OPS:
            ap.error(f"--ops: unknown op {op!r} (ops: {', '.join(ALL_OPS)})")
    for p in args.providers or ():
        if p not in cases.PROVIDERS and p not in serve.NAMES:
            ap.error(f"--providers: unknown provider {p!r} (providers: {', '.join(cases.PROVIDERS)}; serve: "
                     f"{', '.join(serve.NAMES)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    shape_set = "full" if args.full else (args.shapes or ("gpu" if device.type == "cuda" else "default"))
    if args.dtypes:
        dtypes, dtype_skips = [cases.to_dtype(d) for d in args.dtypes], {}
    else:
        dtypes, dtype_skips = cases.default_dtypes(device)
    din_kernels.set_checks(False)
    print(f"din_kernels benchmarks: device {device}, shape set {shape_set!r}, dtypes "
          f"{[cases.dtype_name(d) for d in dtypes]}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    for d, why in dtype_skips.items():
        print(f"  skipped dtype {d}: {why}", flush=True)
    t0 = time.perf_counter()
    peaks = floor.measure_peaks(device, dtypes)
    print(f"  peaks: {', '.join(f'{k} {v / 1e9:.1f} GFLOP/s' for k, v in peaks.flops.items())}, copy "
          f"{peaks.bandwidth / 1e9:.1f} GB/s ({time.perf_counter() - t0:.1f} s)", flush=True)
    runner = Runner(args, device, dtypes, peaks)
    os.makedirs(args.out, exist_ok=True)
    stem = args.stem or report.device_slug([runner.meta])
    latest = os.path.join(args.out, f"{stem}-latest.jsonl")
    runner.stream = open(latest, "w")
    ops = args.ops or list(ALL_OPS)
    weights = [BUDGET_WEIGHTS[op] for op in ops]
    for i, op in enumerate(ops):
        if op == "serve":
            if args.time_budget:
                runner.deadline = runner.started + args.time_budget * sum(weights[: i + 1]) / sum(weights)
            serve.run(runner, shape_set)
            continue
        shapes = [cases.shrink(s, args.shrink) if args.shrink > 1 else s for s in cases.SHAPE_SETS[shape_set][op]]
        runner.run_op(op, shapes, budget_share=sum(weights[: i + 1]) / sum(weights))
    if not args.no_headline:
        runner.ensure_headline()
    for d, why in dtype_skips.items():
        for op in [o for o in args.ops or cases.OPS if o != "serve"]:  # serve runs float32 only
            runner.rows.append({"op": op, "provider": None, "mode": None, "dtype": d, "device": peaks.device,
                                "status": "skipped", "reason": why, "torch": torch.__version__,
                                "git": runner.meta["git"]})
    elapsed = time.perf_counter() - started
    rows = runner.rows
    runner.stream.close()
    runner.stream = None
    report.write_jsonl(rows, latest)  # again, now with the peak memory the subprocesses measured
    if not args.no_history:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        shutil.copyfile(latest, os.path.join(args.out, f"{stem}-{stamp}.jsonl"))
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"date": runner.meta["timestamp"], "command": command.strip()}
    paths = report.write_reports(rows, args.out, meta, plots=not args.no_plots, stem=stem)
    print()
    print(report.markdown(rows, meta))
    print(f"rows: {latest} ({len(report.ok_rows(rows))} measured, {len(rows) - len(report.ok_rows(rows))} not)")
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    print(f"total time: {elapsed:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
