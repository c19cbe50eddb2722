"""Input checks shared by every backend (SPEC section 5).

Shape, dtype and device checks are static and always run. Value checks of ``lengths``/``offsets`` read the
tensors (a device-to-host sync on a GPU) and run only while :func:`din_kernels.checks_enabled` is true.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
NORMALIZATIONS = ("none", "softmax")


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a dtype in {[str(d) for d in FLOAT_DTYPES]}, got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")


def check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but query is on {device}: all tensors must share one device")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_attention_inputs(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | None,
    offsets: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: str,
    act_weights: Sequence[torch.Tensor],
    act_means: Sequence[torch.Tensor],
    act_vars: Sequence[torch.Tensor],
    normalization: str,
    training: bool,
    query_offsets: torch.Tensor | None = None,
) -> None:
    """Static checks of :func:`din_kernels.target_attention`'s arguments (no device sync). With ``query_offsets``
    [U + 1] the keys describe U users and ``query`` holds their candidates; without, U = B."""
    check_float("query", query)
    check_float("keys", keys)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_rank("query", query, 2, "[B, D]")
    B, D = query.shape
    if query_offsets is not None:
        check_index("query_offsets", query_offsets)
        check_rank("query_offsets", query_offsets, 1, "[U + 1]")
        if query_offsets.shape[0] < 1:
            raise ValueError("query_offsets must have U + 1 >= 1 entries, got 0")
    U = B if query_offsets is None else query_offsets.shape[0] - 1
    users = "the batch size" if query_offsets is None else "the number of users U (query_offsets has U + 1 entries)"
    if (lengths is None) == (offsets is None):
        raise ValueError("give exactly one of lengths (padded keys [B, T, D]) and offsets (jagged keys [N, D])")
    if lengths is not None:
        check_index("lengths", lengths)
        check_rank("keys", keys, 3, "[B, T, D] when lengths is given")
        check_rank("lengths", lengths, 1, "[B]")
        if keys.shape[0] != U:
            who = "query has" if query_offsets is None else "query_offsets gives U ="
            raise ValueError(f"keys has batch size {keys.shape[0]} but {who} {U}")
        if lengths.shape[0] != U:
            raise ValueError(f"lengths has {lengths.shape[0]} entries but {users} is {U}")
    else:
        check_index("offsets", offsets)
        check_rank("keys", keys, 2, "[N, D] when offsets is given")
        check_rank("offsets", offsets, 1, "[B + 1]")
        if offsets.shape[0] != U + 1:
            need = "B + 1" if query_offsets is None else "U + 1 (the users of query_offsets)"
            raise ValueError(f"offsets has {offsets.shape[0]} entries but must have {need} = {U + 1}")
    if keys.shape[-1] != D:
        raise ValueError(f"keys has embedding size D = {keys.shape[-1]} but query has D = {D}")
    check_device(query.device, query_offsets=query_offsets)
    check_device(query.device, keys=keys, lengths=lengths, offsets=offsets)
    if len(weights) < 2 or len(weights) != len(biases):
        raise ValueError(
            f"weights and biases must hold one entry per Linear layer (at least 2), got {len(weights)} weights "
            f"and {len(biases)} biases"
        )
    fan_in = 4 * D
    for i, (w, b) in enumerate(zip(weights, biases)):
        check_float(f"weights[{i}]", w)
        check_float(f"biases[{i}]", b)
        check_device(query.device, **{f"weights[{i}]": w, f"biases[{i}]": b})
        if w.dim() != 2 or w.shape[1] != fan_in:
            raise ValueError(f"weights[{i}] must have shape [H, {fan_in}], got {tuple(w.shape)}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"biases[{i}] must have shape [{w.shape[0]}], got {tuple(b.shape)}")
        fan_in = w.shape[0]
    if weights[-1].shape[0] != 1:
        raise ValueError(f"the last layer must have one output (the score), got weights[-1] {tuple(weights[-1].shape)}")
    widths = [w.shape[0] for w in weights[:-1]]
    n_act = len(widths) if activation in ("prelu", "dice") else 0
    if len(act_weights) != n_act:
        raise ValueError(
            f"activation {activation!r} needs {n_act} act_weights (one per hidden layer), got {len(act_weights)}"
        )
    for i, a in enumerate(act_weights):
        check_float(f"act_weights[{i}]", a)
        check_device(query.device, **{f"act_weights[{i}]": a})
        if a.numel() not in (1, widths[i]) or a.dim() != 1:
            raise ValueError(f"act_weights[{i}] must have shape [{widths[i]}] or [1], got {tuple(a.shape)}")
    if activation == "dice":
        for name, stats in (("act_means", act_means), ("act_vars", act_vars)):
            if len(stats) != len(widths):
                raise ValueError(
                    f"activation 'dice' needs {len(widths)} {name} (one per hidden layer), got {len(stats)}"
                )
            for i, s in enumerate(stats):
                check_float(f"{name}[{i}]", s)
                check_device(query.device, **{f"{name}[{i}]": s})
                if s.shape != (widths[i],):
                    raise ValueError(f"{name}[{i}] must have shape [{widths[i]}], got {tuple(s.shape)}")
    elif len(act_means) or len(act_vars):
        raise ValueError(f"act_means/act_vars are only used by activation 'dice', not {activation!r}")


def check_lengths_values(lengths: torch.Tensor, T: int) -> None:
    """Value check of ``lengths`` (0 <= lengths[b] <= T); reads the tensor."""
    if lengths.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(lengths))
    if lo < 0 or hi > T:
        raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values in [{lo}, {hi}]")


def check_offsets_values(offsets: torch.Tensor, N: int, name: str = "offsets", rows: str = "keys") -> None:
    """Value check of ``offsets`` (offsets[0] = 0, non-decreasing, offsets[-1] = N); reads the tensor. ``name``/
    ``rows``: the argument and what it partitions, for messages."""
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if last != N:
        raise ValueError(f"{name}[-1] must equal the number of {rows} N = {N}, got {last}")
    if offsets.numel() > 1:
        steps = offsets[1:] - offsets[:-1]
        worst = int(steps.min())
        if worst < 0:
            at = int(torch.argmin(steps))
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{at}] = {int(offsets[at])} > "
                f"{name}[{at + 1}] = {int(offsets[at + 1])}"
            )
