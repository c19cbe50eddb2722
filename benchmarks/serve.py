"""The serving section of ``make bench``: many candidates scored against each user's history, once per history.

    python benchmarks/run.py --ops serve                  # the section alone (the default sizes below)
    python benchmarks/run.py --ops serve --shapes quick   # tiny sizes, a few seconds

Users with T behaviours each (every slot valid), C candidates per user, items D wide (two fields of D/2, one user
field of D/2, :func:`benchmarks.cases.din_model`), attention (80, 40) sigmoid, MLP (200, 80) PReLU; float32,
inference (eval, no autograd). The sizes are :data:`SETS` (``--shrink`` divides the number of users). Parts:

- ``attention``: target attention alone on U users x C candidates. ``query_offsets_<backend>``: the op with
  ``query_offsets`` [U + 1] over keys [U, T, D]; ``repeated_<backend>``: the same op on the history repeated once per
  candidate (keys [U * C, T, D]); ``deepctr_torch``: DeepCTR-Torch's ``AttentionSequencePoolingLayer`` on that repeat
  (our weights copied). The repeat is built inside the timed call: a server receives each history once.
- ``model``: the whole DIN. ``rank_<backend>``: ``DIN.rank(batch, candidates, candidate_offsets)``;
  ``forward_repeated_<backend>``: ``DIN.forward`` on the repeated batch (each user's row once per candidate, built in
  the timed call); ``deepctr_torch``: DeepCTR-Torch's DIN on that batch (its own weights, as in ``din_step``);
  ``package``: ``din_kernels.load`` of ``din_kernels.export`` (an AOTInductor package of ``rank``, exported once
  per run: ``export_s`` in its rows).
- ``latency``: the model's providers on one user with ``latency_C`` candidates, one call at a time for
  ``latency_s`` seconds each under ``torch.set_num_threads(1)`` (restored after): p50 and p99 ms, the floor from a
  one-thread matmul peak measured there.
- ``sweep``: the model's throughput against the number of candidates per user (``sweep_C``) for ``sweep_U`` users
  (the plot ``<stem>-serve-sweep.png``).

Every row has ``users_per_s`` and ``candidates_per_s`` (from the median) and its floor: attention rows
:func:`benchmarks.floor.serve_attention_cost`, the model's :func:`benchmarks.floor.serve_model_cost`, at the run's
peaks or those measured at the section's start where higher (:func:`section_peaks`). Rows are
``op: "serve"``, ``mode: "forward"``, with ``part``, ``method`` and ``backend``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import torch

from . import cases, floor, measure

PARTS = ("attention", "model", "latency", "sweep")
ATT_HIDDEN = list(cases.DIN_ATT_HIDDEN)
MLP_HIDDEN = list(cases.DIN_MLP_HIDDEN)
ACTIVATION = "sigmoid"
DTYPE = torch.float32

# U users x C candidates for the attention and model parts; the latency part is one user x latency_C candidates;
# the sweep, sweep_U users x each of sweep_C. The default set fits the section in about 2 minutes on 2 shared cores.
SETS = {
    "quick": {"U": 2, "C": 6, "T": 12, "D": 16, "vocab": 1000, "reference_U": 2, "latency_C": 6, "latency_s": 0.2,
              "sweep_U": 2, "sweep_C": [1, 4, 16], "package": False},
    "default": {"U": 16, "C": 200, "T": 100, "D": 128, "vocab": 100_000, "reference_U": 2, "latency_C": 200,
                "latency_s": 1.0, "sweep_U": 2, "sweep_C": [1, 10, 100, 200, 1000]},
    "full": {"U": 64, "C": 200, "T": 100, "D": 128, "vocab": 100_000, "reference_U": 8, "latency_C": 200,
             "latency_s": 4.0, "sweep_U": 8, "sweep_C": [1, 10, 100, 200, 1000]},
    "gpu": {"U": 256, "C": 200, "T": 100, "D": 128, "vocab": 100_000, "reference_U": 16, "latency_C": 200,
            "latency_s": 2.0, "sweep_U": 64, "sweep_C": [1, 10, 100, 200, 1000]},
}
# "package": False leaves the exported package out (its export compiles for tens of seconds)
# the latency part: calls per provider at least and at most (latency_s seconds of calls in between)
LATENCY_MIN, LATENCY_MAX = 10, 400
# the package's backend: the first of these that runs here
PACKAGE_BACKENDS = ("cuda", "cpu", "triton", "torch")


@dataclass(frozen=True)
class Provider:
    """One way of serving a part: ``method`` on ``backend`` (None for the peer)."""

    name: str
    part: str  # attention | model
    method: str  # query_offsets | repeated | deepctr_torch | rank | forward_repeated | package
    backend: str | None


def _all_providers() -> list[Provider]:
    out = []
    for b in (*cases.KERNEL_BACKENDS, "reference"):
        out.append(Provider(f"query_offsets_{b}", "attention", "query_offsets", b))
    for b in cases.KERNEL_BACKENDS:
        out.append(Provider(f"repeated_{b}", "attention", "repeated", b))
    out.append(Provider(cases.PEER, "attention", cases.PEER, None))
    for b in cases.KERNEL_BACKENDS:
        out.append(Provider(f"rank_{b}", "model", "rank", b))
    for b in cases.KERNEL_BACKENDS:
        out.append(Provider(f"forward_repeated_{b}", "model", "forward_repeated", b))
    out.append(Provider("package", "model", "package", None))
    out.append(Provider(cases.PEER, "model", cases.PEER, None))
    return out


PROVIDERS = tuple(_all_providers())
# what --providers may name for this section: a provider, a method or a backend
NAMES = tuple(dict.fromkeys([p.name for p in PROVIDERS] + [p.method for p in PROVIDERS]
                            + [p.backend for p in PROVIDERS if p.backend]))


def provider(part: str, name: str) -> Provider:
    for p in PROVIDERS:
        if p.name == name and p.part == ("attention" if part == "attention" else "model"):
            return p
    raise ValueError(f"no serve provider {name!r} for part {part!r}")


def settings(shape_set: str, shrink: int = 1) -> dict:
    """The sizes of ``shape_set`` (:data:`SETS`), the numbers of users divided by ``shrink``."""
    s = dict(SETS[shape_set])
    if shrink > 1:
        for key in ("U", "reference_U", "sweep_U"):
            s[key] = max(s[key] // shrink, 1)
    return s


def shape_of(part: str, s: dict, U: int | None = None, C: int | None = None) -> dict:
    """The row's shape fields of ``part``."""
    shape = {"part": part, "U": s["U"] if U is None else U, "C": s["C"] if C is None else C, "T": s["T"],
             "D": s["D"], "hidden": list(ATT_HIDDEN), "activation": ACTIVATION}
    if part != "attention":
        shape.update({"mlp": list(MLP_HIDDEN), "vocab": s["vocab"]})
    return shape


def package_reason() -> str | None:
    """Why the exported package cannot be benchmarked here, or None."""
    import din_kernels

    missing = [f"din_kernels.{n}" for n in ("export", "load") if not callable(getattr(din_kernels, n, None))]
    if missing:
        return (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in this version of the package "
                "(the AOTInductor package of DIN.rank)")
    return None


def _package_backend(device: torch.device) -> str | None:
    for b in PACKAGE_BACKENDS:
        if cases.provider_unavailable_reason("din_step", b, device) is None:
            return b
    return None


def unavailable_reason(p: Provider, device: torch.device, shape: dict | None = None) -> str | None:
    """None when ``p`` runs here, otherwise why not."""
    op = "attention" if p.part == "attention" else "din_step"
    if p.method == cases.PEER:
        return cases.provider_unavailable_reason(op, cases.PEER, device, DTYPE, shape)
    if p.method == "package":
        reason = package_reason()
        if reason is None and _package_backend(device) is None:
            reason = "no backend of the package runs DIN here"
        return reason
    return cases.provider_unavailable_reason(op, p.backend, device, DTYPE, shape)


def available(part: str, device: torch.device, wanted: list[str] | None = None,
              shape: dict | None = None) -> tuple[list[Provider], dict[str, str]]:
    """``(providers of part that run here, {name: why not})``; ``wanted`` (``--providers``) keeps those whose name,
    method or backend it names."""
    kind = "attention" if part == "attention" else "model"
    ok, skipped = [], {}
    for p in PROVIDERS:
        if p.part != kind or (wanted and not {p.name, p.method, p.backend} & set(wanted)):
            continue
        reason = unavailable_reason(p, device, shape)
        if reason is None:
            ok.append(p)
        else:
            skipped[p.name] = reason
    return ok, skipped


# ------------------------------------------------------------------------------------------------------- inputs


def _attention_inputs(shape: dict, device: torch.device, seed: int):
    import din_kernels

    U, C, T, D = shape["U"], shape["C"], shape["T"], shape["D"]

    def make():
        g = torch.Generator(device=device).manual_seed(seed)
        keys = torch.randn(U, T, D, generator=g, device=device).to(DTYPE)
        query = torch.randn(U * C, D, generator=g, device=device).to(DTYPE)
        lengths = torch.full((U,), T, dtype=torch.long, device=device)
        query_offsets = torch.arange(U + 1, device=device) * C
        user = torch.repeat_interleave(torch.arange(U, device=device), C)
        torch.manual_seed(seed)
        master = din_kernels.TargetAttention(D, ATT_HIDDEN, ACTIVATION, backend="reference")
        return keys, query, lengths, query_offsets, user, master

    return cases._cached(("serve-attention", U, C, T, D, str(device), seed), make)


def _model_inputs(shape: dict, device: torch.device, seed: int):
    U, C, T, K = shape["U"], shape["C"], shape["T"], shape["vocab"]

    def make():
        g = torch.Generator(device=device).manual_seed(seed)
        n_cate = max(K // 100, 2)
        hist = torch.stack([torch.randint(1, K, (U, T), generator=g, device=device),
                            torch.randint(1, n_cate, (U, T), generator=g, device=device)], -1)
        batch = {"hist": hist, "hist_len": torch.full((U,), T, dtype=torch.long, device=device),
                 "user": torch.randint(1, K, (U, 1), generator=g, device=device)}
        candidates = torch.stack([torch.randint(1, K, (U * C,), generator=g, device=device),
                                  torch.randint(1, n_cate, (U * C,), generator=g, device=device)], -1)
        candidate_offsets = torch.arange(U + 1, device=device) * C
        user = torch.repeat_interleave(torch.arange(U, device=device), C)
        return batch, candidates, candidate_offsets, user, n_cate

    return cases._cached(("serve-model", U, C, T, K, str(device), seed), make)


def repeated_batch(batch: dict, candidates: torch.Tensor, user: torch.Tensor) -> dict:
    """The plain batch equal to ``rank(batch, candidates, offsets)``: each user's row once per candidate
    (``user``: the candidate's user), the candidate as its ``ad``."""
    return {"hist": batch["hist"][user], "hist_len": batch["hist_len"][user], "user": batch["user"][user],
            "ad": candidates}


# ---------------------------------------------------------------------------------------------------- workloads


def _inference(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def build(name: str, shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> cases.Workload:
    """The :class:`benchmarks.cases.Workload` of provider ``name`` on ``shape`` (its ``part`` says which), mode
    ``forward``; ``info`` holds the row's counts (``Nq``, ``N``, ``pairs``)."""
    if dtype != DTYPE:
        raise ValueError(f"the serve section runs {DTYPE} only, got {dtype}")
    p = provider(shape["part"], name)
    device = torch.device(device)
    U, C, T = shape["U"], shape["C"], shape["T"]
    info = {"Nq": U * C, "N": U * T, "pairs": U * C * T}
    if p.part == "attention":
        run, keep = _attention_call(p, shape, device, seed)
    else:
        run, keep = _model_call(p, shape, device, seed)
        if p.method == "package":
            info["export_s"] = keep[-1]
    return cases.Workload({"forward": lambda: run}, info=info, keep=keep)


def _attention_call(p: Provider, shape: dict, device: torch.device, seed: int):
    import din_kernels

    keys, query, lengths, query_offsets, user, master = _attention_inputs(shape, device, seed)
    D = shape["D"]
    if p.method == cases.PEER:
        from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer

        peer = AttentionSequencePoolingLayer(att_hidden_units=ATT_HIDDEN, att_activation=ACTIVATION, embedding_dim=D)
        cases.copy_attention_weights(master, peer)
        peer = peer.to(device, DTYPE).eval()
        return _inference(lambda: peer(query.unsqueeze(1), keys[user], lengths[user].unsqueeze(1)).squeeze(1)), [peer]
    module = din_kernels.TargetAttention(D, ATT_HIDDEN, ACTIVATION, backend=p.backend)
    module.load_state_dict(master.state_dict())
    module = module.to(device, DTYPE).eval()
    if p.method == "query_offsets":
        return _inference(lambda: module(query, keys, lengths, query_offsets=query_offsets)), [module]
    return _inference(lambda: module(query, keys[user], lengths[user])), [module]


_MODELS: dict = {}


def _model(backend: str | None, shape: dict, n_cate: int, device: torch.device, seed: int):
    """Our DIN on ``backend`` (the peer's for None) in eval mode, built once per size and seed within a run of the
    section (the same weights as a fresh build: the seed is set before each)."""
    key = (backend, shape["T"], shape["D"], shape["vocab"], str(device), seed)
    if key not in _MODELS:
        torch.manual_seed(seed)
        model = (cases.peer_din_model(shape, n_cate, device) if backend is None
                 else cases.din_model(shape, n_cate, backend, device))
        _MODELS[key] = model.eval()
    return _MODELS[key]


def _model_call(p: Provider, shape: dict, device: torch.device, seed: int):
    batch, candidates, candidate_offsets, user, n_cate = _model_inputs(shape, device, seed)
    if p.method == cases.PEER:
        model = _model(None, shape, n_cate, device, seed)
        return _inference(lambda: model(cases.peer_din_input(model, repeated_batch(batch, candidates, user)))
                          .squeeze(-1)), [model]
    backend = _package_backend(device) if p.method == "package" else p.backend
    model = _model(backend, shape, n_cate, device, seed)
    if p.method == "rank":
        return _inference(lambda: model.rank(batch, candidates, candidate_offsets)), [model]
    if p.method == "forward_repeated":
        return _inference(lambda: model(repeated_batch(batch, candidates, user))), [model]
    package, seconds = _package(model, batch, candidates, shape, device, seed)
    return _inference(lambda: package(batch, candidates, candidate_offsets)), [model, package, seconds]


_PACKAGES: dict = {}


def _package(model, batch: dict, candidates: torch.Tensor, shape: dict, device: torch.device, seed: int):
    """``(din_kernels.load of din_kernels.export(model, ...), seconds the export and load took)``: sizes are dynamic,
    so one export per model and process, on an example of 2 users x 2 candidates (the first users of ``batch``, its
    first candidate)."""
    import din_kernels

    key = (shape["T"], shape["D"], shape["vocab"], str(device), seed)
    if key not in _PACKAGES:
        users = torch.tensor([0, min(1, batch["hist"].shape[0] - 1)], device=device)
        example = {k: v[users] for k, v in batch.items()}
        folder = tempfile.mkdtemp(prefix="din-serve-")
        path = os.path.join(folder, "rank.pt2")
        start = time.perf_counter()
        din_kernels.export(model, example, path, candidates=candidates[:1].repeat(4, 1),
                           candidate_offsets=torch.tensor([0, 2, 4], device=device))
        _PACKAGES[key] = (din_kernels.load(path), time.perf_counter() - start)
    return _PACKAGES[key]


# ------------------------------------------------------------------------------------------------------- the rows


def cost(shape: dict, info: dict) -> floor.Cost:
    """The FLOP/byte model of one row (:mod:`benchmarks.floor`)."""
    size = DTYPE.itemsize
    if shape["part"] == "attention":
        return floor.serve_attention_cost(shape["U"], info["Nq"], info["N"], info["pairs"], shape["D"],
                                          shape["hidden"], size, shape["activation"])
    di, _, user_dim = cases.din_fields(shape)
    return floor.serve_model_cost(shape["U"], info["Nq"], info["N"], info["pairs"], shape["T"], di, user_dim,
                                  shape["hidden"], shape["mlp"], size)


def _add(runner, p: Provider, shape: dict, timing: measure.Timing, info: dict, peaks: floor.Peaks,
         extra: dict | None = None) -> dict:
    c = cost(shape, info)
    row = runner._base("serve", p.name, shape, DTYPE, "forward")
    row.update({"method": p.method, "backend": p.backend or (_package_backend(runner.device)
                                                              if p.method == "package" else None)})
    row.update(info)
    seconds = timing.median_ms / 1e3
    row.update({
        "status": "ok", "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
        "samples": timing.samples, "peak_mem_mb": None,
        "mem_method": "cuda_max_allocated" if runner.device.type == "cuda" else "rss_hwm_subprocess",
        "floor_ms": peaks.floor_ms(c, "float32"), "flops": c.flops, "bytes": c.bytes,
        "gflops": floor.gflops(c, timing.median_ms), "gbps": floor.gbps(c, timing.median_ms),
        "peak_rate_tflops": peaks.rate("float32") / 1e12,
        "users_per_s": shape["U"] / seconds if seconds else float("nan"),
        "candidates_per_s": info["Nq"] / seconds if seconds else float("nan"),
    })
    row.update(extra or {})
    row.update({k: v for k, v in runner.meta.items() if k not in row})
    import din_kernels

    row["checks"] = din_kernels.checks_enabled()
    runner._append(row)
    frac = 100 * row["floor_ms"] / timing.median_ms if timing.median_ms else float("nan")
    tail = f"  p99 {row['p99_ms']:.3f} ms" if "p99_ms" in row else ""
    print(f"  serve {shape['part']:9s} U={shape['U']:<4d} C={shape['C']:<5d} {p.name:24s} {timing.median_ms:10.3f} ms"
          f"  [{timing.p20_ms:.3f}-{timing.p80_ms:.3f}]  {row['users_per_s']:9.1f} users/s "
          f"{row['candidates_per_s']:10.0f} cand/s  floor {row['floor_ms']:.3f} ms ({frac:.0f}%){tail}", flush=True)
    return row


QUICK_PACKAGE = "the export compiles for tens of seconds: not in the quick set"


def _providers(runner, part: str, shape: dict, select=None) -> list[Provider]:
    """The part's providers that run here (and ``select(provider)`` keeps); the others recorded with their reason."""
    ok, skipped = available(part, runner.device, runner.args.providers, shape)
    keep = select or (lambda p: True)
    for name, reason in skipped.items():
        if keep(provider(part, name)):
            runner.skip("serve", name, shape, DTYPE, reason, mode="forward")
    return [p for p in ok if keep(p)]


def _build_all(runner, providers: list[Provider], shape: dict) -> dict:
    workloads = {}
    for p in providers:
        try:
            workloads[p] = build(p.name, shape, DTYPE, runner.device, runner.args.seed)
        except Exception as e:  # noqa: BLE001 - a provider that fails to build is reported, the rest go on
            runner.skip("serve", p.name, shape, DTYPE, measure.format_exception(e), status="error", mode="forward")
    return workloads


def _time(runner, workloads: dict, scale: float = 1.0) -> dict:
    """``{provider: Timing or exception}``, interleaved on the CPU; ``scale`` < 1 shortens the timing (the sweep:
    that share of the seconds, one round)."""
    args = runner.args
    if runner.device.type == "cuda":
        out = {}
        for p, wl in workloads.items():
            try:
                out[p] = measure.time_cuda(wl.setups["forward"](), rep_ms=max(int(args.rep_ms * scale), 20))
            except Exception as e:  # noqa: BLE001
                out[p] = e
        return out
    timed = measure.time_interleaved({p: wl.setups["forward"] for p, wl in workloads.items()},
                                     rounds=min(args.rounds, 2) if scale >= 1 else 1,
                                     min_run_time=args.min_run_time * scale, min_samples=args.min_samples,
                                     max_run_time=args.max_run_time * scale)
    return timed


def section_peaks(runner) -> floor.Peaks:
    """The run's peaks raised to what a float32 measurement at the section's start shows (CPU): on a shared machine
    the rates at the run's start, minutes earlier, can be far from those of now, and a peak is the best the device
    shows."""
    if runner.device.type != "cpu":
        return runner.peaks
    fresh = floor.measure_peaks(runner.device, (DTYPE,), min_run_time=0.5)
    flops = dict(runner.peaks.flops, float32=max(runner.peaks.rate("float32"), fresh.rate("float32")))
    return floor.Peaks(runner.peaks.device, flops, max(runner.peaks.bandwidth, fresh.bandwidth))


def _throughput(runner, part: str, shape: dict, peaks: floor.Peaks, scale: float = 1.0, select=None) -> list[dict]:
    providers = _providers(runner, part, shape, select)
    workloads = _build_all(runner, providers, shape)
    rows = []
    for p, res in _time(runner, workloads, scale).items():
        if isinstance(res, Exception):
            runner.skip("serve", p.name, shape, DTYPE, measure.format_exception(res), status="error", mode="forward")
        else:
            rows.append(_add(runner, p, shape, res, workloads[p].info, peaks))
    del workloads
    cases.clear_cache()
    return rows


def percentile(times_s: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of per-call seconds, in ms (linear interpolation between order statistics)."""
    xs = sorted(times_s)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return 1e3 * (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def _latency(runner, shape: dict, seconds: float, select=None) -> list[dict]:
    """One call at a time under one thread, providers in turns: p50 and p99 of the per-call times."""
    providers = _providers(runner, "latency", shape, select)
    threads = torch.get_num_threads()
    cuda = runner.device.type == "cuda"
    torch.set_num_threads(1)
    try:
        peaks = runner.peaks
        if not cuda:
            peaks = floor.measure_peaks(runner.device, (DTYPE,), min_run_time=0.3)
            peaks.device = runner.peaks.device
        workloads = _build_all(runner, providers, shape)
        fns, times, failed = {}, {}, {}
        for p, wl in workloads.items():
            try:
                fns[p] = wl.setups["forward"]()
                for _ in range(2):  # warm-up
                    fns[p]()
                times[p] = []
            except Exception as e:  # noqa: BLE001
                failed[p] = e
        rounds = max(runner.args.rounds, 1)
        per_round = max(-(-LATENCY_MIN // rounds), 1)  # calls a round at least
        for _ in range(rounds):
            for p in [p for p in fns if p not in failed]:
                start, calls = time.perf_counter(), 0
                try:
                    while len(times[p]) < LATENCY_MAX:
                        t0 = time.perf_counter()
                        fns[p]()
                        if cuda:
                            torch.cuda.synchronize()
                        times[p].append(time.perf_counter() - t0)
                        calls += 1
                        if calls >= per_round and time.perf_counter() - start > seconds / rounds:
                            break
                except Exception as e:  # noqa: BLE001
                    failed[p] = e
    finally:
        torch.set_num_threads(threads)
    rows = []
    for p in workloads:
        if p in failed:
            runner.skip("serve", p.name, shape, DTYPE, measure.format_exception(failed[p]), status="error",
                        mode="forward")
            continue
        ts = times[p]
        timing = measure.Timing(percentile(ts, 0.5), percentile(ts, 0.2), percentile(ts, 0.8), len(ts))
        extra = {"threads": 1, "p50_ms": timing.median_ms, "p99_ms": percentile(ts, 0.99),
                 "max_ms": 1e3 * max(ts), "peak_rate_tflops": peaks.rate("float32") / 1e12}
        rows.append(_add(runner, p, shape, timing, workloads[p].info, peaks, extra))
    del workloads, fns
    cases.clear_cache()
    return rows


def _memory(runner, rows: list[dict]) -> None:
    """Fills ``peak_mem_mb`` of the CPU rows: one fresh process per provider (its parts one after the other, as the
    other ops' shapes are), see :mod:`benchmarks.measure`."""
    by_provider: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] == "package":
            r["mem_error"] = "not measured: the package would be exported again in the memory process"
        elif r["backend"] == "reference":
            r["mem_error"] = "not measured: the reference repeats each history literally (the repeated rows show it)"
        else:
            by_provider.setdefault(r["provider"], []).append(r)
    keys = ("part", "U", "C", "T", "D", "hidden", "activation", "mlp", "vocab")
    for name, rs in by_provider.items():
        items = [(str(i), {k: r[k] for k in keys if k in r}, r["dtype"], ["forward"]) for i, r in enumerate(rs)]
        start = time.perf_counter()
        result = measure.cpu_peaks_in_subprocess("serve", name, items, runner.args.seed,
                                                 timeout=runner.args.mem_timeout)
        for i, r in enumerate(rs):
            value = result.get(str(i), {}).get("forward")
            if isinstance(value, (int, float)):
                r["peak_mem_mb"] = value
            else:
                r["mem_error"] = value or "not measured"
        print(f"  memory serve {name}: {time.perf_counter() - start:.1f} s", flush=True)


def run(runner, shape_set: str) -> list[dict]:
    """Measures the section's parts in order; under a time budget a part after the first starts only while the
    section's share is left. Returns the rows (also in ``runner.rows``)."""
    s = settings(shape_set, runner.args.shrink)
    print(f"[serve] T={s['T']} D={s['D']}, attention {tuple(ATT_HIDDEN)} {ACTIVATION}, MLP {tuple(MLP_HIDDEN)}",
          flush=True)
    rows: list[dict] = []
    peaks = section_peaks(runner)
    print(f"  serve peaks: float32 {peaks.rate('float32') / 1e9:.1f} GFLOP/s, copy {peaks.bandwidth / 1e9:.1f} GB/s",
          flush=True)
    ref = (lambda p: p.backend == "reference") if s["reference_U"] != s["U"] else None
    plan = [("attention", lambda: _throughput(runner, "attention", shape_of("attention", s), peaks,
                                              select=(lambda p: not ref(p)) if ref else None))]
    if ref:  # the reference repeats each history literally: measured on fewer users
        plan.append(("attention", lambda: _throughput(runner, "attention",
                                                      shape_of("attention", s, U=s["reference_U"]), peaks,
                                                      select=ref)))
    model = None
    if not s.get("package", True):
        model = lambda p: p.method != "package"  # noqa: E731
        if not runner.args.providers or "package" in runner.args.providers:
            runner.skip("serve", "package", shape_of("model", s), DTYPE, QUICK_PACKAGE, mode="forward")
    plan += [("model", lambda: _throughput(runner, "model", shape_of("model", s), peaks, select=model)),
             ("latency", lambda: _latency(runner, shape_of("latency", s, U=1, C=s["latency_C"]), s["latency_s"],
                                          model))]
    plan += [("sweep", lambda c=c: _throughput(runner, "sweep", shape_of("sweep", s, U=s["sweep_U"], C=c), peaks,
                                               0.5, model)) for c in s["sweep_C"]]
    try:
        for i, (part, fn) in enumerate(plan):
            if i and runner.out_of_time():
                runner.skip("serve", "all", {"part": part}, DTYPE,
                            f"the run's time budget ({runner.args.time_budget:.0f} s, serve's share of it) was spent "
                            "before this part", mode="forward")
                continue
            start = time.perf_counter()
            rows += fn()
            print(f"  serve {part}: {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        _MODELS.clear()
        _PACKAGES.clear()
    if runner.device.type == "cpu" and not runner.args.no_memory:
        _memory(runner, [r for r in rows if r["part"] in ("attention", "model")])
    return rows
