"""Timing and peak memory of one workload.

Timing: on the CPU ``torch.utils.benchmark.Timer.blocked_autorange`` after a warm-up call, run long enough for at
least ``min_samples`` blocks (a slow call gets fewer, never under 3, once ``max_run_time`` is reached); on a GPU
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). Both report the median and the 20th and 80th
percentiles of the per-call times.

Peak memory, as growth over what the inputs (and, for ``backward``, the retained graph) already hold:

- GPU: ``torch.cuda.max_memory_allocated`` around one call.
- CPU: the resident set of a fresh process per provider, forked from a server that has imported torch and the
  package but run nothing (``multiprocessing`` forkserver). In it, each mode is warmed up once, its gradients
  dropped, ``malloc_trim`` run, the baseline taken from ``VmRSS``, the high-water mark reset
  (``/proc/self/clear_refs``), the call run once, and ``VmHWM`` read. glibc's mmap threshold is pinned to 64 KiB
  there, so large tensors map and unmap their pages and the high-water mark follows the live tensors. A
  differentiable op is measured with one forward and one backward (after one warm-up of both), which give all three
  modes (:func:`rss_split_peaks_mb`). Where the high-water mark cannot be reset (not Linux), ``ru_maxrss`` growth
  over the baseline is used without the warm-up.
"""

from __future__ import annotations

import ctypes
import gc
import math
import multiprocessing
import os
import resource
import sys
import time
import timeit
import traceback
from dataclasses import dataclass

import torch

from . import cases


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 20th and 80th percentiles over ``samples`` samples."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def quantiles(times_s: list[float]) -> Timing:
    """The :class:`Timing` of per-call times in seconds (linear interpolation between order statistics)."""
    if not times_s:
        raise ValueError("no samples")
    xs = sorted(times_s)

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return 1e3 * (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))

    return Timing(q(0.5), q(0.2), q(0.8), len(xs))


def time_cpu(fn, min_run_time: float = 0.5, min_samples: int = 5, max_run_time: float = 8.0) -> Timing:
    """Times ``fn()`` on the CPU with ``torch.utils.benchmark.Timer.blocked_autorange``.

    A first call warms up (first-touch page faults, lazy initialisation, compilation) and estimates the call's
    length; the measurement then runs for ``max(min_run_time, min_samples * estimate)`` seconds, capped at
    ``max_run_time`` but never fewer than 3 calls.
    """
    from torch.utils import benchmark

    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    run_time = max(min_run_time, min_samples * first)
    run_time = max(min(run_time, max_run_time), 3 * first)
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=run_time)
    return quantiles(list(m.times))


SLOW_CALL_S = 0.2


def time_interleaved(setups: dict, rounds: int = 3, min_run_time: float = 0.3, min_samples: int = 5,
                     max_run_time: float = 3.0, resetup: bool = False) -> dict:
    """Times several providers of one row in turns, so that a change in background load (a shared machine) hits
    every provider alike instead of whichever ran at that moment.

    ``setups[name]()`` returns the callable to time. Each provider is warmed up once (its first call, which also
    estimates its length ``t``); then in each of ``rounds`` rounds every provider runs for its share of
    ``max(min_run_time, min_samples * t)`` seconds (capped at ``max_run_time``, at least one call a round):
    calls shorter than :data:`SLOW_CALL_S` with ``Timer.blocked_autorange`` (blocks that amortise the timer),
    longer ones one call per sample with the standard library's ``timeit.Timer(fn).timeit(1)`` (the clock
    ``torch.utils.benchmark`` wraps, without the two warm-up calls its ``timeit`` adds: at that length there is
    nothing to amortise). ``resetup``: call ``setups[name]()`` again each round (e.g. a
    ``backward`` row, so that only one provider's retained graph is alive at a time). Returns
    ``{name: Timing or the exception that stopped it}``.
    """
    from torch.utils import benchmark

    fns, share, first, times, out = {}, {}, {}, {}, {}
    for name, setup in setups.items():
        try:
            fn = setup()
            start = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - start
            fns[name] = None if resetup else fn
            del fn
            total = min(max(min_run_time, min_samples * first[name]), max_run_time)
            share[name], times[name] = total / rounds, []
        except Exception as e:  # noqa: BLE001 - a failing provider is reported, the others go on
            out[name] = e
    for _ in range(rounds):
        for name in list(share):
            try:
                fn = fns[name] or setups[name]()
                if first[name] < SLOW_CALL_S:
                    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                    times[name].extend(timer.blocked_autorange(min_run_time=share[name]).times)
                else:
                    timer, spent = timeit.Timer(fn, timer=time.perf_counter), 0.0
                    while True:
                        t = timer.timeit(number=1)
                        times[name].append(t)
                        spent += t
                        if spent + t > share[name]:
                            break
                del fn, timer
            except Exception as e:  # noqa: BLE001
                out[name] = e
                del share[name]
    for name in share:
        out[name] = quantiles(times[name])
    return out


def time_cuda(fn, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """Times ``fn()`` on a GPU with ``triton.testing.do_bench`` (median, p20, p80 of the runs)."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    n = max(int(rep_ms / max(median, 1e-3)), 1)
    return Timing(float(median), float(p20), float(p80), n)


def time_fn(fn, device: torch.device, **kwargs) -> Timing:
    if torch.device(device).type == "cuda":
        return time_cuda(fn, **{k: v for k, v in kwargs.items() if k in ("warmup_ms", "rep_ms")})
    return time_cpu(fn, **{k: v for k, v in kwargs.items() if k in ("min_run_time", "min_samples", "max_run_time")})


def cuda_peak_mb(run, zero) -> float:
    """Peak GPU memory (MiB) one call of ``run`` allocates over what is already allocated."""
    torch.cuda.synchronize()
    out = run()  # warm-up: lazy initialisation must not count
    del out
    zero()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(peak - base, 0) / 2**20


# ------------------------------------------------------------------------------------------------ CPU memory


def _status_kb() -> dict[str, int]:
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1])
    return vals


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def rss_peak_mb(run, zero) -> float:
    """Peak resident memory (MiB) one call of ``run`` adds over the process's resident set before it.

    Meant for a fresh process (see the module docstring); in a long-lived one, memory the allocator keeps from
    earlier work can hide part of the growth.
    """
    libc = _glibc()
    resettable = os.path.exists("/proc/self/clear_refs") and _reset_hwm()
    if resettable:
        out = run()  # warm-up; its high-water mark is reset below
        del out
    zero()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    if resettable:
        base = _status_kb()["VmRSS"]
        _reset_hwm()
        out = run()
        peak = _status_kb()["VmHWM"]
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there, KiB on Linux
            base, peak = base / 1024, peak / 1024
    del out
    return max(peak - base, 0) / 1024


def rss_split_peaks_mb(forward, backward, warm_up, zero) -> dict[str, float]:
    """Peak resident growth of ``forward``, ``backward`` and both, from one forward and one backward.

    ``forward``: the growth of the forward over the inputs; ``backward``: the growth of the backward over the
    inputs and the retained graph (what a ``backward`` row times); ``full``: the larger of the forward's peak and
    the graph plus the backward's peak, both over the inputs. ``warm_up()`` runs one forward and backward first
    (lazy initialisation, compilation), ``zero()`` drops the gradients it left. Needs a resettable high-water mark
    (``/proc/self/clear_refs``).
    """
    libc = _glibc()
    warm_up()
    zero()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    base = _status_kb()["VmRSS"]
    _reset_hwm()
    out = forward()
    fwd = _status_kb()["VmHWM"] - base
    mid = _status_kb()["VmRSS"]
    _reset_hwm()
    backward(out)
    bwd = _status_kb()["VmHWM"] - mid
    del out
    return {"forward": max(fwd, 0) / 1024, "backward": max(bwd, 0) / 1024,
            "full": max(fwd, mid - base + bwd, 0) / 1024}


def _memory_worker(conn, op: str, provider: str, items: list, device: str, threads: int, seed: int) -> None:
    """Child process: the peak memory of ``provider`` on each ``(key, shape, dtype name, modes)`` of ``items``;
    sends ``{key: {mode: MiB or "error: ..."}}``."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so large blocks are always mapped and unmapped
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give freed heap back promptly
    torch.set_num_threads(threads)
    import din_kernels

    din_kernels.set_checks(False)
    result = {}
    for key, shape, dtype_name, modes in items:
        res = result.setdefault(key, {})
        try:
            wl = cases.build(op, provider, shape, cases.to_dtype(dtype_name), torch.device(device), seed)
        except Exception as e:  # noqa: BLE001 - any failure becomes the row's reason
            res.update({m: f"error: {type(e).__name__}: {e}" for m in modes})
            continue
        if wl.split is not None and os.path.exists("/proc/self/clear_refs") and _reset_hwm():
            try:
                forward, backward = wl.split
                res.update(rss_split_peaks_mb(forward, backward, wl.setups["full"](), wl.zero))
            except Exception as e:  # noqa: BLE001
                res.update({m: f"error: {type(e).__name__}: {e}" for m in modes})
            modes = []
        for mode in modes:
            try:
                run = wl.setups[mode]()
                res[mode] = rss_peak_mb(run, wl.zero)
                del run
            except Exception as e:  # noqa: BLE001
                res[mode] = f"error: {type(e).__name__}: {e}"
            wl.zero()
            gc.collect()
        del wl
        cases.clear_cache()
        gc.collect()
    conn.send(result)
    conn.close()


_CONTEXT = None


def _context():
    """A forkserver context whose server has imported torch and the package (fork after import, before any
    thread pool starts); spawn where forkserver is not available."""
    global _CONTEXT
    if _CONTEXT is None:
        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "din_kernels", "benchmarks.cases", "benchmarks.measure"])
        except ValueError:
            ctx = multiprocessing.get_context("spawn")
        _CONTEXT = ctx
    return _CONTEXT


def cpu_peaks_in_subprocess(op: str, provider: str, items: list, seed: int = 0, timeout: float = 600.0) -> dict:
    """Runs :func:`_memory_worker` in a fresh process; returns its result, or ``{key: {mode: "error: ..."}}``
    for every item when the process fails (e.g. killed for memory) or times out."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_worker,
                       args=(child, op, provider, items, "cpu", torch.get_num_threads(), seed), daemon=True)
    try:
        proc.start()
        child.close()
        if parent.poll(timeout):
            result = parent.recv()
        else:
            result = None
        proc.join(10)
    except (EOFError, OSError) as e:
        result = None
        why = f"error: the memory process failed: {e}"
    else:
        why = f"error: the memory process exited with {proc.exitcode} or timed out after {timeout:.0f} s"
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if result is None:
        result = {key: {m: why for m in modes} for key, _, _, modes in items}
    return result


def format_exception(e: BaseException) -> str:
    """One line: the exception's type and message, and where it was raised."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"
