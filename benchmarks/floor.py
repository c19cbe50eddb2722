"""The physical floor of every benchmark row: FLOP and byte models per op, and the measured peaks of the device.

``floor_ms = max(flops / peak_flops, bytes / peak_bandwidth)``: the time an ideal kernel would need on this device,
limited by either its arithmetic or its memory traffic. The peaks are measured once per run (a large matmul for the
rate, a large copy for the bandwidth), never assumed, so a row says how far it is from what *this* machine can do.

The models count the work the op must do, not what a particular implementation does:

- only the valid behaviours ``N = sum(lengths)`` are counted (padding is free for an ideal kernel);
- bytes are the compulsory traffic: every input read once and every output written once, except where a global
  reduction forces a second pass (Dice's batch statistics);
- multiply-adds count 2 FLOPs; transcendental functions count a small constant (:data:`ACT_FLOPS`).

Modes: ``forward``; ``backward`` (the gradients of every input and parameter, recomputing the forward's cheap
intermediates instead of reading them, as the flash-style kernels do); ``full`` (forward + backward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MODES = ("forward", "backward", "full")

# FLOPs per element of each hidden activation (forward); the backward counts twice as much.
ACT_FLOPS = {"sigmoid": 4, "relu": 1, "prelu": 2, "dice": 13}

# Dice, per element of x [N, C] in training: sum and sum of squares (3), normalise (2), sigmoid (4),
# p * x + (1 - p) * alpha * x (4).
DICE_FWD_FLOPS = 13


@dataclass(frozen=True)
class Cost:
    """The work of one call: ``flops`` floating point operations and ``bytes`` of compulsory memory traffic."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scale(self, flops: float = 1.0, nbytes: float = 1.0) -> Cost:
        return Cost(self.flops * flops, self.bytes * nbytes)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def mlp_params(in_dim: int, hidden: Sequence[int]) -> int:
    """Parameter count of ``Linear(in_dim, H1), ..., Linear(Hn, 1)`` (weights and biases)."""
    widths = (in_dim, *hidden, 1)
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def attention_cost(B: int, N: int, D: int, hidden: Sequence[int], mode: str, itemsize: int,
                   activation: str = "sigmoid") -> Cost:
    """Target attention (SPEC section 1) on ``N`` valid behaviours of ``B`` samples, embedding width ``D``.

    Forward FLOPs, with the factorised first layer:

    - per sample: forming ``M_b = (Wk - Wd) + Wp * q_b`` (``2 * D * H1``) and ``c_b = q_b @ (Wq + Wd)^T + b1``
      (``2 * D * H1 + H1``);
    - per behaviour: the first layer ``k_t @ M_b^T + c_b`` (``2 * D * H1 + H1``), each activation
      (``ACT_FLOPS * H_i``), the upper layers (``2 * H_i * H_{i+1} + H_{i+1}``), the score (``2 * Hn + 1``) and
      the weighted sum (``2 * D``).

    Backward: twice the forward (the gradient of each operand of every product) plus one recompute of the forward,
    i.e. ``3 * F``; full: ``4 * F``.

    Bytes (``itemsize`` per element, int64 lengths): forward reads ``keys`` (``N * D``), ``query`` (``B * D``),
    ``lengths`` and the MLP's parameters and writes ``v_U`` (``B * D``); backward reads ``keys``, ``query``,
    ``dv_U``, ``lengths`` and the parameters and writes ``dkeys``, ``dquery`` and the parameter gradients.
    """
    _check_mode(mode)
    h1 = hidden[0]
    widths = (*hidden, 1)
    per_sample = 4 * D * h1 + h1
    per_behaviour = 2 * D * h1 + h1 + 2 * D
    for i, h in enumerate(hidden):
        per_behaviour += ACT_FLOPS[activation] * h + 2 * h * widths[i + 1] + widths[i + 1]
    fwd_flops = B * per_sample + N * per_behaviour
    params = mlp_params(4 * D, hidden)
    fwd_bytes = itemsize * (N * D + 2 * B * D + params) + 8 * B
    bwd_bytes = itemsize * (2 * N * D + 3 * B * D + 2 * params) + 8 * B
    fwd, bwd = Cost(fwd_flops, fwd_bytes), Cost(3 * fwd_flops, bwd_bytes)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def dice_cost(N: int, C: int, mode: str, itemsize: int, affine: bool = False) -> Cost:
    """Dice (SPEC section 2) in training on ``x`` ``[N, C]``, statistics over all N positions.

    The batch statistics are a global reduction, so an ideal kernel still passes over ``x`` twice when it does not
    fit in cache: forward reads ``x`` for the statistics, reads it again and writes ``y`` (``3 * N * C``
    elements); backward reads ``x`` and ``dy`` for the statistics' gradients, then reads both again and writes
    ``dx`` (``5 * N * C``). Per-channel vectors (alpha, statistics, affine weight and bias) are counted too.
    FLOPs: :data:`DICE_FWD_FLOPS` per element forward, three times that backward (2x plus recompute).
    """
    _check_mode(mode)
    elems = N * C
    vectors = C * (3 + (2 if affine else 0))
    fwd = Cost(DICE_FWD_FLOPS * elems, itemsize * (3 * elems) + 4 * vectors)
    bwd = Cost(3 * DICE_FWD_FLOPS * elems, itemsize * (5 * elems) + 8 * vectors)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def mba_cost(M: int, U: int, D: int, itemsize: int, id_bytes: int = 8) -> Cost:
    """Mini-batch aware L2 (SPEC section 3) with ``M`` looked-up ids of which ``U`` are distinct, rows of width D.

    Reads the ids (``M * id_bytes``), writes and reads back the distinct ids (``2 * U * 8``), reads each distinct
    id's count (``U * 8``) and table row, reads and writes its gradient row (``3 * U * D`` elements). FLOPs: per
    distinct row, ``||W[j]||^2`` (``2 * D``), the scale by ``lam / n[j]`` and the add into ``grad`` (``2 * D``).
    Nothing depends on the table size K: that is the point of the method. The op is a gradient update, so it has
    one mode (``forward``).
    """
    return Cost(4 * U * D + U, M * id_bytes + 3 * U * 8 + 3 * U * D * itemsize)


def din_step_cost(B: int, N: int, T: int, item_dim: int, other_dim: int, att_hidden: Sequence[int],
                  mlp_hidden: Sequence[int], mode: str, itemsize: int, n_item_fields: int = 2,
                  n_other_fields: int = 1) -> Cost:
    """One DIN batch: embedding lookups, target attention, the MLP over ``[other, interest, ad]``.

    ``forward`` is an inference batch: gather ``B * (1 + T)`` item rows (only the ``N`` valid behaviours count) and
    ``B`` rows of the other fields, :func:`attention_cost` forward and the MLP (``2 * in * out`` per sample and
    layer, activations 2 per element). ``full`` is a training step: the attention's full cost, the MLP three times,
    the gathers, the gradient scatter into the touched rows and an SGD update of the touched rows and of the dense
    parameters (read parameter and gradient, write parameter). The ids are ``n_item_fields`` and
    ``n_other_fields`` int64 columns per sample.
    """
    if mode not in ("forward", "full"):
        raise ValueError(f"din_step has modes forward (inference) and full (training step), got {mode!r}")
    rows = (B + N) * item_dim + B * other_dim
    ids = 8 * (B * (1 + T) * n_item_fields + B * n_other_fields)
    widths = (other_dim + 2 * item_dim, *mlp_hidden, 1)
    mlp_flops = B * sum(2 * a * b + 2 * b for a, b in zip(widths[:-1], widths[1:]))
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    att = attention_cost(B, N, item_dim, att_hidden, "forward" if mode == "forward" else "full", itemsize)
    if mode == "forward":
        return att + Cost(mlp_flops, itemsize * (rows + n_params) + ids)
    return att + Cost(3 * mlp_flops + 2 * rows, itemsize * (4 * rows + 4 * n_params) + ids)


def serve_attention_cost(U: int, Nq: int, N: int, pairs: int, D: int, hidden: Sequence[int], itemsize: int,
                         activation: str = "sigmoid") -> Cost:
    """Target attention of ``Nq`` candidates over the histories of their ``U`` users (``query_offsets``; forward,
    inference): ``N`` valid behaviours over the U users, ``pairs`` (candidate, behaviour) pairs (the sum over the
    candidates of their user's length).

    FLOPs: :func:`attention_cost`'s forward with one sample per candidate (``B = Nq``: each candidate's factorised
    first layer ``M_b``, ``c_b``) and ``pairs`` behaviours: every pair's MLP depends on both the candidate and the
    behaviour, so no kernel avoids it. Bytes: the history-only part once per user: the keys (``N * D``), lengths
    and ``query_offsets`` (int64, ``U`` and ``U + 1``); the candidates (``Nq * D``) read and the pooled ``[Nq, D]``
    written once; the MLP's parameters.
    """
    fwd = attention_cost(Nq, pairs, D, hidden, "forward", itemsize, activation)
    params = mlp_params(4 * D, hidden)
    return Cost(fwd.flops, itemsize * (N * D + 2 * Nq * D + params) + 8 * (2 * U + 1))


def serve_model_cost(U: int, Nq: int, N: int, pairs: int, T: int, item_dim: int, user_dim: int,
                     att_hidden: Sequence[int], mlp_hidden: Sequence[int], itemsize: int, n_item_fields: int = 2,
                     n_user_fields: int = 1) -> Cost:
    """The whole DIN scoring ``Nq`` candidates of ``U`` users (``DIN.rank``; inference): the attention of
    :func:`serve_attention_cost` (each history gathered and read once per user), the user rows (``U``), the MLP
    over ``[user, interest, candidate]`` per candidate (``2 * in * out`` and 2 per output element a layer), the ids
    (int64: ``n_item_fields`` per behaviour slot ``U * T`` and per candidate, ``n_user_fields`` per user) and one
    logit per candidate written."""
    widths = (user_dim + 2 * item_dim, *mlp_hidden, 1)
    mlp_flops = Nq * sum(2 * a * b + 2 * b for a, b in zip(widths[:-1], widths[1:]))
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    ids = 8 * ((U * T + Nq) * n_item_fields + U * n_user_fields + U + 1)
    att = serve_attention_cost(U, Nq, N, pairs, item_dim, att_hidden, itemsize)
    return att + Cost(mlp_flops, itemsize * (U * user_dim + n_params + Nq) + ids)


def floor_ms(cost: Cost, peak_flops: float, peak_bandwidth: float) -> float:
    """``max(flops / peak_flops, bytes / peak_bandwidth)`` in milliseconds (rates in FLOP/s and bytes/s)."""
    if peak_flops <= 0 or peak_bandwidth <= 0:
        raise ValueError(f"peaks must be positive, got {peak_flops} FLOP/s and {peak_bandwidth} B/s")
    return 1e3 * max(cost.flops / peak_flops, cost.bytes / peak_bandwidth)


@dataclass
class Peaks:
    """Measured peaks of one device: FLOP/s by dtype name, bytes/s of a large copy."""

    device: str
    flops: dict[str, float] = field(default_factory=dict)
    bandwidth: float = 0.0

    def rate(self, dtype: str) -> float:
        """The matmul rate of ``dtype`` (float32's when that dtype was not measured)."""
        return self.flops.get(dtype, self.flops.get("float32", 0.0))

    def floor_ms(self, cost: Cost, dtype: str) -> float:
        return floor_ms(cost, self.rate(dtype), self.bandwidth)

    def as_dict(self) -> dict:
        return {"device": self.device, "peak_tflops": {k: v / 1e12 for k, v in self.flops.items()},
                "peak_gbps": self.bandwidth / 1e9}


def _best_seconds(fn, device: torch.device, min_run_time: float) -> float:
    """The fastest time of ``fn`` (seconds) over ``min_run_time``: a peak is the best the device shows."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(int(min_run_time * 1e3), 50), return_mode="min") / 1e3
    from torch.utils import benchmark

    fn()  # warm-up (first-touch page faults, thread pool start)
    m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return min(m.raw_times) / m.number_per_run


def measure_peaks(device: torch.device, dtypes: Sequence[torch.dtype] = (torch.float32,),
                  min_run_time: float = 1.0) -> Peaks:
    """Measures the device's matmul rate for each dtype and its copy bandwidth.

    CPU: a square matmul of n = 2048 (fp32; 1024 for 16-bit types, which many CPUs emulate) and the copy of a
    256 MiB tensor (well past the last-level cache). GPU: n = 8192 matmuls and a 2 GiB copy. The copy moves each
    byte twice (read and write). Each peak is the fastest call over ``min_run_time`` seconds: on a machine shared
    with other work, the best moment is the closest to what the device can do.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    peaks = Peaks(device=device_name(device))
    for dtype in dtypes:
        n = 8192 if gpu else (2048 if dtype.itemsize >= 4 else 1024)
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_seconds(lambda a=a, b=b: torch.mm(a, b), device, min_run_time)
        peaks.flops[str(dtype).removeprefix("torch.")] = 2 * n**3 / seconds
        del a, b
    numel = (2 << 30 if gpu else 256 << 20) // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, min_run_time)
    peaks.bandwidth = 2 * src.numel() * src.element_size() / seconds
    return peaks


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` or ``platform``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """``NVIDIA H200``-style name of a GPU, ``<model name> (<threads> threads)`` of the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def gflops(cost: Cost, ms: float) -> float:
    """Achieved GFLOP/s of ``cost`` done in ``ms`` milliseconds."""
    return cost.flops / (ms * 1e6) if ms > 0 and not math.isnan(ms) else float("nan")


def gbps(cost: Cost, ms: float) -> float:
    """Achieved GB/s of ``cost`` done in ``ms`` milliseconds."""
    return cost.bytes / (ms * 1e6) if ms > 0 and not math.isnan(ms) else float("nan")
