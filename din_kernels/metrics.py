"""Evaluation metrics of the paper (section 6.3): AUC, GAUC (eq. 10), logloss and RelaImpr (eq. 11).

AUC and logloss call scikit-learn, GAUC pandas (the ``train`` extra); they are imported on first use, so this module
imports with the core alone.
"""

from __future__ import annotations

import numpy as np

from ._extras import require


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def auc(labels, scores) -> float:
    """ROC AUC (``sklearn.metrics.roc_auc_score``); ``labels`` ``[S]`` in {0, 1}, ``scores`` ``[S]``."""
    return float(require("sklearn.metrics", "train").roc_auc_score(_np(labels), _np(scores)))


def gauc(users, labels, scores) -> float:
    """The paper's eq. 10: ``sum_u n_u * AUC_u / sum_u n_u`` with ``n_u`` the user's impressions; users whose
    impressions are all of one class are skipped. Vectorised: per-user average ranks (ties share their mean rank)
    give each user's Mann-Whitney AUC in one pass. ``users``, ``labels``, ``scores``: ``[S]``. NaN when no user has
    both classes."""
    pd = require("pandas", "train")
    frame = pd.DataFrame({"u": _np(users), "y": _np(labels).astype(np.float64), "s": _np(scores).astype(np.float64)})
    if len(frame) != len(_np(labels)) or len(frame) != len(_np(scores)):
        raise ValueError(f"users, labels and scores must have one length, got {len(_np(users))}, "
                         f"{len(_np(labels))}, {len(_np(scores))}")
    frame["r"] = frame.groupby("u")["s"].rank(method="average")
    frame["ry"] = frame["r"] * frame["y"]
    g = frame.groupby("u").agg(n=("y", "size"), pos=("y", "sum"), rank_pos=("ry", "sum"))
    g = g[(g["pos"] > 0) & (g["pos"] < g["n"])]
    if g.empty:
        return float("nan")
    neg = g["n"] - g["pos"]
    user_auc = (g["rank_pos"] - g["pos"] * (g["pos"] + 1) / 2) / (g["pos"] * neg)
    return float((user_auc * g["n"]).sum() / g["n"].sum())


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross entropy of the click probabilities ``probs`` ``[S]`` (clipped to [eps, 1 - eps])."""
    log_loss = require("sklearn.metrics", "train").log_loss
    return float(log_loss(_np(labels), np.clip(_np(probs).astype(np.float64), eps, 1 - eps), labels=[0, 1]))


def rela_impr(model_auc: float, base_auc: float) -> float:
    """The paper's eq. 11: ``(AUC(model) - 0.5) / (AUC(base) - 0.5) - 1`` (a fraction; x100 for percent)."""
    if base_auc == 0.5:
        raise ValueError(f"RelaImpr is undefined for a base AUC of 0.5 (got base_auc={base_auc})")
    return (model_auc - 0.5) / (base_auc - 0.5) - 1.0


def evaluate(users, labels, logits) -> dict[str, float]:
    """``{auc, gauc, logloss}`` from logits ``[S]``."""
    lg = _np(logits).astype(np.float64)
    probs = 1 / (1 + np.exp(-lg))
    return {"auc": auc(labels, lg), "gauc": gauc(users, labels, lg), "logloss": logloss(labels, probs)}
