"""Case builders shared by the op tests of every backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from conftest import TOLERANCES, assert_close, concrete_backend

from din_kernels import target_attention
from din_kernels._jagged import offsets_from_lengths, padded_mask


@dataclass
class AttentionCase:
    """float64 master copies of one target attention problem."""

    query: torch.Tensor
    keys: torch.Tensor  # padded [B, T, D]
    lengths: torch.Tensor
    weights: list
    biases: list
    act_weights: list = field(default_factory=list)
    act_means: list = field(default_factory=list)
    act_vars: list = field(default_factory=list)
    grad_out: torch.Tensor | None = None
    grad_scores: torch.Tensor | None = None

    @property
    def offsets(self):
        return offsets_from_lengths(self.lengths)

    def jagged_keys(self):
        return self.keys[padded_mask(self.lengths, self.keys.shape[1])]


def attention_case(B, T, D, hidden=(8, 4), activation="sigmoid", lengths=None, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    rand = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        if B > 1:
            lengths[0], lengths[-1] = 0, T  # always one empty and one full sequence
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    widths = (4 * D, *hidden, 1)
    weights = [rand(o, i) * scale / i**0.5 * 2 for i, o in zip(widths[:-1], widths[1:])]
    biases = [rand(o) * 0.1 for o in widths[1:]]
    case = AttentionCase(rand(B, D), rand(B, T, D), lengths, weights, biases)
    if activation in ("prelu", "dice"):
        case.act_weights = [torch.rand(h, generator=g, dtype=f64) * 0.5 for h in hidden]
    if activation == "dice":
        case.act_means = [rand(h) * 0.1 for h in hidden]
        case.act_vars = [torch.rand(h, generator=g, dtype=f64) + 0.5 for h in hidden]
    case.grad_out = rand(B, D)
    case.grad_scores = rand(B, T)
    return case


def run_attention(case: AttentionCase, backend, dtype, layout="padded", activation="sigmoid", normalization="none",
                  training=False, scale=None, with_scores=True, device="cpu"):
    """Forward + backward of ``target_attention``; returns ``(out, w_padded, grads dict, running stats)``.

    Inputs and parameters are cast to ``dtype`` (the reference runs on the float64 copies of the rounded values).
    """
    cast = lambda t: t.detach().to(dtype).to(device).clone().requires_grad_()  # noqa: E731
    q, kp = cast(case.query), case.keys.detach().to(dtype).to(device).clone()
    lengths = case.lengths.to(device)
    mask = padded_mask(lengths, kp.shape[1])
    if layout == "padded":
        k = kp.requires_grad_()
        extra = {"lengths": lengths}
    else:
        k = kp[mask].detach().requires_grad_()
        extra = {"offsets": case.offsets.to(device)}
    W = [cast(x) for x in case.weights]
    b = [cast(x) for x in case.biases]
    a = [cast(x) for x in case.act_weights]
    means = [x.to(dtype).to(device).clone() for x in case.act_means]
    variances = [x.to(dtype).to(device).clone() for x in case.act_vars]
    out, w = target_attention(q, k, W, b, **extra, activation=activation, act_weights=a, act_means=means,
                              act_vars=variances, normalization=normalization, softmax_scale=scale,
                              training=training, return_scores=True, backend=backend)
    if layout == "jagged":
        w_p = torch.zeros(mask.shape, dtype=w.dtype, device=w.device)
        w_p[mask] = w
    else:
        w_p = w
    go = case.grad_out.to(dtype).to(device)
    loss = (out * go).sum()
    if with_scores:
        loss = loss + (w_p * case.grad_scores.to(dtype).to(device)).sum()
    inputs = [q, k, *W, *b, *a]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = ["query", "keys"] + [f"weights[{i}]" for i in range(len(W))] + [f"biases[{i}]" for i in range(len(b))]
    names += [f"act_weights[{i}]" for i in range(len(a))]
    grads = dict(zip(names, grads))
    if layout == "jagged":
        dk = torch.zeros(kp.shape, dtype=grads["keys"].dtype, device=kp.device)
        dk[mask] = grads["keys"]
        grads["keys"] = dk
    return out, w_p, grads, (means, variances)


def backend_factor(backend: str, dtype, device: str = "cpu") -> float:
    """How much looser ``backend``'s tolerance in ``dtype`` is than the torch backend's (``auto``: the backend it
    picks on ``device``): the factor that :func:`assert_runs_close` takes."""
    return TOLERANCES[(concrete_backend(backend, device), dtype)] / TOLERANCES[("torch", dtype)]


# the Triton kernels' float32 results against the torch backend's, as measured (see TOLERANCES in conftest.py)
TRITON_FLOAT32_FACTOR = backend_factor("triton", torch.float32)


def compare_to_reference(case, backend, dtype, factor=1.0, **kw):
    """Runs ``backend`` in ``dtype`` and the reference in float64 on the same rounded values; asserts closeness
    (at ``factor`` times the tolerance of ``backend`` in ``dtype``, :data:`TOLERANCES`)."""
    rounded = AttentionCase(**{k: _round(v, dtype) for k, v in case.__dict__.items()})
    out, w, grads, stats = run_attention(rounded, backend, dtype, **kw)
    kw_ref = dict(kw, device="cpu")
    ref = run_attention(rounded, "reference", torch.float64, **kw_ref)
    assert_runs_close((out, w, grads, stats), ref, dtype, factor, concrete_backend(backend, kw.get("device", "cpu")))
    return out, w, grads


def rounded_case(case: AttentionCase, dtype) -> AttentionCase:
    """``case`` with every floating tensor rounded to ``dtype``, kept in float64 (what a backend in ``dtype`` sees)."""
    return AttentionCase(**{k: _round(v, dtype) for k, v in case.__dict__.items()})


def assert_runs_close(got, ref, dtype, factor=1.0, backend="torch"):
    """Asserts that two :func:`run_attention` results (``got`` in ``dtype`` from ``backend``, ``ref`` in float64)
    agree: output, scores, every gradient and the running statistics, within ``factor`` times the tolerance of
    ``backend`` in ``dtype``."""
    (out, w, grads, stats), (ref_out, ref_w, ref_grads, ref_stats) = got, ref
    assert out.dtype == dtype and w.dtype == dtype
    check = lambda a, b, name: assert_close(a.cpu(), b.cpu(), dtype, name, factor, backend)  # noqa: E731
    check(out, ref_out, "out")
    check(w, ref_w, "scores")
    for name, g in ref_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == dtype, f"{name} gradient dtype {grads[name].dtype}"
        check(grads[name], g, f"d {name}")
    for a, b in zip(stats[0] + stats[1], ref_stats[0] + ref_stats[1]):
        check(a, b, "running stats")


def _round(v, dtype):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(dtype).to(torch.float64)
    if isinstance(v, list):
        return [_round(x, dtype) for x in v]
    return v


__all__ = ["TOLERANCES", "TRITON_FLOAT32_FACTOR", "AttentionCase", "assert_runs_close", "attention_case",
           "backend_factor", "compare_to_reference", "rounded_case", "run_attention"]
