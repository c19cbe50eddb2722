"""The paper's models (section 4): BaseModel (Embedding&MLP with sum pooling) and DIN (target attention pooling),
driven by a small declared feature schema.

A batch is a dict of int64 tensors (see :meth:`din_kernels.data.SeqData.batch`):

- ``ad`` ``[B, F]``: the candidate's item fields (goods id, category id, ...), in ``schema.item_fields`` order;
- ``hist``: the behaviours' item fields, padded ``[B, T, F]`` with ``hist_len`` ``[B]``, or jagged ``[N, F]`` with
  ``hist_offsets`` ``[B + 1]``; the ad and the behaviours share one embedding table per field, and a behaviour's
  (and the ad's) embedding is the concatenation of its fields' embeddings (width ``Di = sum(embed_dim)``);
- ``user`` ``[B, P]``: one-hot profile fields; one ``[B, L]`` tensor per multi-hot field (key = its name, 0-padded,
  sum pooled);
- ``context`` ``[B, C]``: context fields.

Id 0 is padding in every table (its row is zero, gets no gradient and no regularisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._jagged import CandidateIndex, JaggedIndex, padded_mask, segment_sum
from .._validate import check_choice, check_index
from ..backend import BACKENDS, checks_enabled
from ..ops.attention import check_attention_index
from . import embedding as _embedding
from .attention import TargetAttention
from .dice import Dice
from .embedding import MBAEmbedding

MLP_ACTIVATIONS = ("prelu", "dice")


def _table(vocab: int, dim: int, counts: Tensor | None, lam: float, backend: str) -> MBAEmbedding:
    """An MBAEmbedding on ``backend`` when the embedding implements it (e.g. ``torch``, ``triton``), else on
    ``auto`` (e.g. for ``reference``, which names the attention and Dice oracles)."""
    table_backend = backend if backend in _embedding.SUPPORTED else "auto"
    return MBAEmbedding(vocab, dim, counts, lam, padding_idx=0, backend=table_backend)


@dataclass(frozen=True)
class Field:
    """A categorical field: ``vocab_size`` ids including the padding id 0, embedded in ``embed_dim``."""

    name: str
    vocab_size: int
    embed_dim: int = 8


@dataclass(frozen=True)
class FeatureSchema:
    """The model's input fields. Every field owns one embedding table named after it; ``item_fields`` are shared by
    the candidate ad and the behaviours."""

    item_fields: tuple[Field, ...]
    user_fields: tuple[Field, ...] = ()
    user_multi_fields: tuple[Field, ...] = ()
    context_fields: tuple[Field, ...] = ()

    def __post_init__(self) -> None:
        if not self.item_fields:
            raise ValueError("item_fields must hold at least one field (the goods id)")
        names = [f.name for f in self.all_fields()]
        if len(set(names)) != len(names):
            raise ValueError(f"field names must be unique, got {names}")
        reserved = {"ad", "hist", "hist_len", "hist_offsets", "user", "context", "label", "uid"}
        for f in self.all_fields():
            if f.vocab_size < 2 or f.embed_dim < 1:
                raise ValueError(f"field {f.name!r} needs vocab_size >= 2 (id 0 is padding) and embed_dim >= 1, "
                                 f"got vocab_size={f.vocab_size}, embed_dim={f.embed_dim}")
        clash = reserved.intersection(f.name for f in self.user_multi_fields)
        if clash:
            raise ValueError(f"multi-hot field names {sorted(clash)} clash with batch keys {sorted(reserved)}")

    @classmethod
    def from_dict(cls, fields: dict) -> FeatureSchema:
        """The schema ``dataclasses.asdict(schema)`` gave (as a checkpoint or a data cache stores it): each group a
        sequence of ``{name, vocab_size, embed_dim}`` (or of :class:`Field`)."""
        return cls(**{group: tuple(f if isinstance(f, Field) else Field(**f) for f in group_fields)
                      for group, group_fields in fields.items()})

    def all_fields(self) -> tuple[Field, ...]:
        return self.item_fields + self.user_fields + self.user_multi_fields + self.context_fields

    @property
    def item_dim(self) -> int:
        """Di: the width of one behaviour's (and the ad's) embedding."""
        return sum(f.embed_dim for f in self.item_fields)

    def tables(self) -> dict[str, int]:
        """``{table name: vocab_size}``."""
        return {f.name: f.vocab_size for f in self.all_fields()}

    def lookups(self, batch: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """Every table's id tensors of one batch: ``[ad ids [B], behaviour ids]`` for the item tables, one tensor
        for the others."""
        out: dict[str, list[Tensor]] = {}
        for j, f in enumerate(self.item_fields):
            out[f.name] = [batch["ad"][:, j], batch["hist"][..., j]]
        for j, f in enumerate(self.user_fields):
            out[f.name] = [batch["user"][:, j]]
        for f in self.user_multi_fields:
            out[f.name] = [batch[f.name]]
        for j, f in enumerate(self.context_fields):
            out[f.name] = [batch["context"][:, j]]
        return out


def _mlp_activation(name: str, width: int, backend: str) -> nn.Module:
    return nn.PReLU(width) if name == "prelu" else Dice(width, backend=backend)


class BaseModel(nn.Module):
    """Embedding&MLP (the paper's base model): the behaviours' embeddings are sum pooled into one user interest
    vector; ``[profile, interest, ad, context]`` goes through an MLP ``mlp_hidden`` (default (200, 80)) with PReLU
    or Dice to one logit (train with ``BCEWithLogitsLoss``).

    Args:
        schema: the fields (:class:`FeatureSchema`).
        mlp_hidden: the MLP's hidden widths.
        activation: ``prelu`` | ``dice`` for the MLP.
        mba_lambda: the mini-batch aware L2 strength (paper 5.1) on every embedding table (0: off); ``counts``
            ``{table: n [K]}`` its per-id sample counts over the training split (default ones).
        embed_init_std: the embeddings' initial standard deviation.
        backend: passed to every op of the model (attention, Dice, the embedding tables where they implement it);
            see :mod:`din_kernels.backend`.
    """

    def __init__(self, schema: FeatureSchema, mlp_hidden: Sequence[int] = (200, 80), activation: str = "prelu",
                 mba_lambda: float = 0.0, counts: dict[str, Tensor] | None = None, embed_init_std: float = 0.05,
                 backend: str = "auto") -> None:
        super().__init__()
        check_choice("activation", activation, MLP_ACTIVATIONS)
        check_choice("backend", backend, BACKENDS)
        self.schema, self.activation, self.backend = schema, activation, backend
        counts = counts or {}
        self.tables = nn.ModuleDict()
        for f in schema.all_fields():
            table = _table(f.vocab_size, f.embed_dim, counts.get(f.name), mba_lambda, backend)
            with torch.no_grad():
                table.weight.normal_(0, embed_init_std)
                table.weight[0] = 0
            self.tables[f.name] = table
        di = schema.item_dim
        in_dim = (sum(f.embed_dim for f in schema.user_fields + schema.user_multi_fields + schema.context_fields)
                  + 2 * di)
        widths = (in_dim, *(int(h) for h in mlp_hidden))
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.mlp_acts = nn.ModuleList(_mlp_activation(activation, h, backend) for h in widths[1:])
        self.out = nn.Linear(widths[-1], 1)

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str | None = None,
                        backend: str | None = None) -> BaseModel:
        """The model a ``python -m din_kernels train`` run saved, rebuilt from its schema and settings and loaded,
        in eval mode on ``device`` (default: the CPU). ``path`` is the run's folder or its ``model.pt``;
        ``backend`` replaces the run's own (e.g. ``"auto"`` for a run trained with ``"triton"``). See
        :func:`din_kernels.load_run`."""
        from ..runs import load_model

        model = load_model(path, device, backend)
        if not isinstance(model, cls):
            raise ValueError(f"{path!r} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def set_mba(self, lam: float, counts: dict[str, Tensor] | None = None) -> None:
        """Sets the MBA strength of every table and, when given, its counts ``{table: [K]}``."""
        for name, table in self.tables.items():
            table.lam = float(lam)
            if counts is not None and name in counts:
                table.counts.copy_(counts[name].to(table.counts.device))

    def mba_penalty(self) -> Tensor:
        """The MBA penalty of the last forward (0-dim), summed over the tables, for logging."""
        total = torch.zeros((), dtype=torch.float64)
        for table in self.tables.values():
            if table.lam and table.last_penalty is not None:
                total = total + table.last_penalty.detach().double().cpu()
        return total

    def _embed(self, batch: dict[str, Tensor], ad_ids: Tensor | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(ad [B, Di], hist [B, T, Di] or [N, Di], other per-sample embeddings [B, *])``: each table is looked
        up once per step (the ad and the behaviours together). ``ad_ids`` [Nq, F] replaces ``batch["ad"]`` (the
        candidates of :meth:`rank`)."""
        ad_ids = batch["ad"] if ad_ids is None else ad_ids
        ad_parts, hist_parts = [], []
        for j, f in enumerate(self.schema.item_fields):
            a, h = self.tables[f.name](ad_ids[:, j], batch["hist"][..., j])
            ad_parts.append(a)
            hist_parts.append(h)
        other = []
        for j, f in enumerate(self.schema.user_fields):
            other.append(self.tables[f.name](batch["user"][:, j]))
        for f in self.schema.user_multi_fields:
            other.append(self.tables[f.name](batch[f.name]).sum(1))
        for j, f in enumerate(self.schema.context_fields):
            other.append(self.tables[f.name](batch["context"][:, j]))
        cat = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return cat(ad_parts), cat(hist_parts), other

    @staticmethod
    def _layout(batch: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        lengths, offsets = batch.get("hist_len"), batch.get("hist_offsets")
        if (lengths is None) == (offsets is None):
            raise ValueError("a batch needs exactly one of 'hist_len' (padded hist [B, T, F]) and 'hist_offsets' "
                             f"(jagged hist [N, F]); got keys {sorted(batch)}")
        return lengths, offsets

    def interest(self, ad: Tensor, hist: Tensor, lengths: Tensor | None, offsets: Tensor | None,
                 return_scores: bool = False, query_offsets: Tensor | None = None):
        """Sum pooling of the behaviours: ``[B, Di]`` (and all-ones weights at the valid positions).

        Memory-safe for any ``lengths``/``offsets`` (the value checks may be off): they are clamped as in
        :mod:`din_kernels._jagged`, and jagged rows that no sample covers get weight 0. With ``query_offsets``
        [U + 1] (:meth:`rank`) the U users' pooled histories are given to each of their ``ad`` rows (scores are not
        returned)."""
        if query_offsets is not None:
            users = ad.new_zeros(1)  # the pooling does not depend on the ad
            pooled = self.interest(users.expand(query_offsets.shape[0] - 1, ad.shape[1]), hist, lengths, offsets)
            cand = CandidateIndex(query_offsets, ad.shape[0])
            rows = pooled[cand.user] if pooled.shape[0] else ad.new_zeros(ad.shape)
            return torch.where(cand.valid[:, None], rows, 0)
        if offsets is not None:
            index = JaggedIndex(offsets, hist.shape[0], ad.shape[0])
            pooled = segment_sum(hist, offsets, index)
            weights = index.valid.to(hist.dtype)
        else:
            mask = padded_mask(lengths, hist.shape[1])
            pooled = (hist * mask.unsqueeze(-1).to(hist.dtype)).sum(1)
            weights = mask.to(hist.dtype)
        return (pooled, weights) if return_scores else pooled

    def forward(self, batch: dict[str, Tensor], return_scores: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B]``; with ``return_scores`` also the behaviours' pooling weights (``[B, T]`` padded, ``[N]``
        jagged)."""
        lengths, offsets = self._layout(batch)
        ad, hist, other = self._embed(batch)
        return self.forward_embedded(ad, hist, other, lengths, offsets, return_scores)

    def rank(self, batch: dict[str, Tensor], candidates: Tensor, candidate_offsets: Tensor) -> Tensor:
        """Scores many candidate ads per user, each user's history embedded and processed once.

        Args:
            batch: one row per user (U rows): ``hist`` with ``hist_len``/``hist_offsets``, ``user``, the multi-hot
                fields, ``context``, as for :meth:`forward` (its ``ad`` is not used).
            candidates: ``[Nq, F]`` the candidates' item fields (``schema.item_fields`` order).
            candidate_offsets: ``[U + 1]``: the candidates of user u are rows ``candidate_offsets[u] :
                candidate_offsets[u + 1]``.
        Returns:
            logits ``[Nq]``, equal to :meth:`forward` on the batch with each user's row repeated once per candidate
            and the candidate as its ``ad``.
        """
        lengths, offsets = self._layout(batch)
        check_index("candidate_offsets", candidate_offsets)
        if candidate_offsets.dim() != 1 or candidate_offsets.shape[0] < 1:
            raise ValueError(f"candidate_offsets must be 1-D [U + 1], got shape {tuple(candidate_offsets.shape)}")
        if checks_enabled():
            candidate_offsets = check_attention_index(candidate_offsets, candidates.shape[0], True,
                                                      "candidate_offsets")
        ad, hist, other = self._embed(batch, ad_ids=candidates)
        cand = CandidateIndex(candidate_offsets, candidates.shape[0])
        other = [o[cand.user] if o.shape[0] else o.new_zeros((candidates.shape[0],) + tuple(o.shape[1:]))
                 for o in other]
        pooled = self.interest(ad, hist, lengths, offsets, query_offsets=candidate_offsets)
        return self._head(other, pooled, ad)

    def _head(self, other: Sequence[Tensor], pooled: Tensor, ad: Tensor) -> Tensor:
        """The MLP over ``[other, interest, ad]`` to one logit per row."""
        h = torch.cat([*other, pooled, ad], -1)
        for linear, act in zip(self.mlp, self.mlp_acts):
            h = act(linear(h))
        return self.out(h).squeeze(-1)

    def forward_embedded(self, ad: Tensor, hist: Tensor, other: Sequence[Tensor], lengths: Tensor | None = None,
                         offsets: Tensor | None = None,
                         return_scores: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The model after its embedding tables, for embeddings looked up elsewhere (e.g. TorchRec's sharded
        tables, :mod:`din_kernels.torchrec`): ``ad`` ``[B, Di]``, ``hist`` padded ``[B, T, Di]`` with ``lengths``
        ``[B]`` or jagged ``[N, Di]`` with ``offsets`` ``[B + 1]``, ``other`` the per-sample embeddings ``[B, *]`` of
        the user (one-hot fields, then the sum-pooled multi-hot fields) and context fields, in schema order.
        Returns what :meth:`forward` returns."""
        pooled = self.interest(ad, hist, lengths, offsets, return_scores)
        scores = None
        if return_scores:
            pooled, scores = pooled
        logits = self._head(other, pooled, ad)
        return (logits, scores) if return_scores else logits


class DIN(BaseModel):
    """Deep Interest Network: the behaviours are pooled by :class:`din_kernels.TargetAttention` with the candidate
    ad as the query (local activation, weights not normalised as in the paper), then the MLP of
    :class:`BaseModel`.

    Args (besides :class:`BaseModel`'s):
        att_hidden: the attention MLP's hidden widths (default (36,), the paper's Fig. 2; the original code used
            (80, 40)).
        att_activation: the attention MLP's activation (default: ``activation``); any of TargetAttention's.
        att_normalization: ``none`` (the paper) | ``softmax``.
    """

    def __init__(self, schema: FeatureSchema, mlp_hidden: Sequence[int] = (200, 80), activation: str = "prelu",
                 att_hidden: Sequence[int] = (36,), att_activation: str | None = None,
                 att_normalization: str = "none", mba_lambda: float = 0.0, counts: dict[str, Tensor] | None = None,
                 embed_init_std: float = 0.05, backend: str = "auto") -> None:
        super().__init__(schema, mlp_hidden, activation, mba_lambda, counts, embed_init_std, backend)
        self.attention = TargetAttention(schema.item_dim, att_hidden, att_activation or activation,
                                         att_normalization, backend=backend)

    def interest(self, ad, hist, lengths, offsets, return_scores=False, query_offsets=None):
        """Target attention pooling ``[B, Di]`` (and the weights ``[B, T]`` / ``[N]``); with ``query_offsets`` the
        ``ad`` rows are the candidates of the users of ``hist`` (:meth:`BaseModel.rank`)."""
        return self.attention(ad, hist, lengths=lengths, offsets=offsets, query_offsets=query_offsets,
                              return_scores=return_scores)
