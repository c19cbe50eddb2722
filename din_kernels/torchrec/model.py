"""TorchRecModel: a DIN / BaseModel whose embedding tables live in TorchRec ``EmbeddingCollection``s.

The tables are grouped by embedding width (an ``EmbeddingCollection`` holds tables of one width), one table per
field as in :class:`din_kernels.BaseModel`; an item field's table serves the ad's key and the behaviours' key. The
rest of the model (the attention, the MLP) is the given model's own modules, called through
:meth:`din_kernels.BaseModel.forward_embedded` with the behaviours jagged (``TargetAttention(offsets=...)``): nothing
is padded.

MBA (the paper's eq. 7, SPEC section 3) through the output gradient. Every lookup of an ``EmbeddingCollection``
returns the row ``W_j`` itself, so adding ``lam * W_j / (n_j * c_j)`` to the output gradient of each of the ``c_j``
lookups of id j in a step sums, in whatever backward owns the table (a plain ``nn.Embedding``, or fbgemm's fused
kernels on the rank that holds the row, which apply the optimizer there), to exactly ``lam * W_j / n_j`` once for
the row. ``c_j`` counts the lookups of every rank (one ``all_gather`` of the step's distinct ids and their local
counts), so the term is that of the global batch. The rows are those of the forward, before the fused optimizer
updates them. TorchRec divides the gradients that its all-to-all sends back by the world size (as DDP averages the
dense gradients); the term is multiplied back by that factor.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from .._jagged import segment_sum
from ..nn.din import BaseModel, FeatureSchema
from .batch import table_features, to_kjt


class _LookupGradient(torch.autograd.Function):
    """``rows * valid`` forward; backward ``grad * valid * grad_scale + share * rows`` (the MBA term of each
    lookup, ``share`` ``[M]``, zero at the padding id)."""

    @staticmethod
    def forward(ctx, rows: Tensor, valid: Tensor, share: Tensor | None, grad_scale: float) -> Tensor:
        ctx.grad_scale = grad_scale
        ctx.save_for_backward(rows, valid, share)
        return rows * valid[:, None].to(rows.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, valid, share = ctx.saved_tensors
        g = grad * valid[:, None].to(grad.dtype)
        if ctx.grad_scale != 1.0:
            g = g * ctx.grad_scale
        if share is not None:
            g = g + share[:, None].to(rows.dtype) * rows
        return g, None, None, None


def lookup_counts(ids: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``[M]``: how many lookups of the whole step, over every rank of ``group`` (``None``: this process only),
    have the id of each entry of ``ids`` ``[M]`` (int64, >= 0). One ``all_gather`` of the sizes, two of the distinct
    ids and their local counts."""
    distinct, inverse, local = torch.unique(ids, return_inverse=True, return_counts=True)
    if group is None or dist.get_world_size(group) == 1:
        return local[inverse]
    world = dist.get_world_size(group)
    size = torch.tensor([distinct.numel()], dtype=torch.long, device=ids.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(int(s) for s in sizes))
    padded_ids = torch.full((longest,), -1, dtype=torch.long, device=ids.device)
    padded_counts = torch.zeros(longest, dtype=torch.long, device=ids.device)
    padded_ids[: distinct.numel()] = distinct
    padded_counts[: distinct.numel()] = local
    all_ids = [torch.empty_like(padded_ids) for _ in range(world)]
    all_counts = [torch.empty_like(padded_counts) for _ in range(world)]
    dist.all_gather(all_ids, padded_ids, group=group)
    dist.all_gather(all_counts, padded_counts, group=group)
    union, where = torch.unique(torch.cat(all_ids), return_inverse=True)
    total = torch.zeros(union.numel(), dtype=torch.long, device=ids.device).index_add_(0, where, torch.cat(all_counts))
    return total[torch.searchsorted(union, distinct)][inverse]


class TorchRecModel(nn.Module):
    """``model`` (a :class:`din_kernels.DIN` or :class:`din_kernels.BaseModel`) with its tables in TorchRec
    ``EmbeddingCollection``s, taking a ``KeyedJaggedTensor`` batch (:func:`din_kernels.torchrec.to_kjt`).

    Args:
        model: the model to take the schema, the dense modules (deep-copied) and the tables' initial weights,
            MBA counts and strength from; it is left as it was.
        schema: the tables' schema when it is not ``model``'s: the same fields and widths, other vocabularies
            (e.g. ``model`` built with tiny ones, so that no whole table is ever allocated). The tables are then
            drawn by :func:`~din_kernels.torchrec.init_tables_` and the counts are ones (see :meth:`set_mba`).
        device: where the tables are allocated. ``"meta"`` (the default) allocates nothing: the tables are
            allocated shard by shard by :func:`din_kernels.torchrec.shard`, which copies the initial weights into
            the shards. Another device allocates them whole here, with ``model``'s weights (one process, unsharded).
    Attributes:
        schema, head (``model`` without its tables), tables (``{"dim<D>": EmbeddingCollection}``), counts (a module
        whose buffer ``<field>`` is that table's ``n [K]``), lam (the MBA strength), last_penalty (the MBA penalty of
        the last training forward over the global batch, 0-dim, or None).
    """

    def __init__(self, model: BaseModel, device: torch.device | str = "meta",
                 schema: FeatureSchema | None = None) -> None:
        super().__init__()
        if schema is not None and [(f.name, f.embed_dim) for f in schema.all_fields()] != [
                (f.name, f.embed_dim) for f in model.schema.all_fields()]:
            raise ValueError(f"schema must have model's fields and widths, got {schema} for {model.schema}")
        self.schema = schema or model.schema
        self.head = copy.deepcopy(model, memo={id(model.tables): nn.ModuleDict()})
        self._features = table_features(self.schema)
        fields = self.schema.all_fields()
        self.tables = nn.ModuleDict()
        for dim in sorted({f.embed_dim for f in fields}):
            configs = [EmbeddingConfig(name=f.name, embedding_dim=dim, num_embeddings=f.vocab_size,
                                       feature_names=self._features[f.name]) for f in fields if f.embed_dim == dim]
            self.tables[f"dim{dim}"] = EmbeddingCollection(tables=configs, device=torch.device(device))
        self.counts = nn.Module()
        for f in fields:
            n = model.tables[f.name].counts.detach().clone() if schema is None else torch.ones(f.vocab_size,
                                                                                              dtype=torch.long)
            self.counts.register_buffer(f.name, n)
        self.lam = float(model.tables[fields[0].name].lam)
        self.last_penalty: Tensor | None = None
        self._base = {}  # {field: first row of its table in one id space over all tables}, for one gather a step
        base = 0
        for f in fields:
            self._base[f.name] = base
            base += f.vocab_size
        # set by din_kernels.torchrec.shard: the group whose lookups make one global batch, and the factor that
        # undoes TorchRec's division of the returned gradients by the world size
        self.group: dist.ProcessGroup | None = None
        self.grad_scale, self.mba_scale = 1.0, 1.0
        self.initial: dict[str, Tensor] | None = (None if schema is not None else
                                                  {f.name: model.tables[f.name].weight.detach() for f in fields})
        if torch.device(device).type != "meta":
            from .state import init_tables_, load_tables_

            if self.initial is None:
                init_tables_(self)
            else:
                load_tables_(self, self.initial)
            self.initial = None

    def set_mba(self, lam: float, counts: Mapping[str, Tensor] | None = None) -> None:
        """Sets the MBA strength and, when given, the counts ``{table: n [K]}`` (as :meth:`BaseModel.set_mba`)."""
        self.lam = float(lam)
        for name, c in (counts or {}).items():
            getattr(self.counts, name).copy_(c)

    def mba_penalty(self) -> Tensor:
        """The MBA penalty of the last training forward (0-dim float64, summed over the tables and the ranks)."""
        if not self.lam or self.last_penalty is None:
            return torch.zeros((), dtype=torch.float64)
        return self.last_penalty.detach().double().cpu()

    def _rows(self, ids: Mapping, looked: Mapping) -> dict[str, Tensor]:
        """``{key: rows [n_key, D]}`` from ``ids`` and ``looked`` (``{key: JaggedTensor}`` of the ids and of their
        rows): each key's rows, zero at id 0, with MBA's term (in training) and the gradient scale in their
        backward."""
        mba = bool(self.lam) and self.training
        per_table = {}
        for name, keys in self._features.items():
            flat = torch.cat([ids[k].values() for k in keys]).long()
            rows = torch.cat([looked[k].values() for k in keys])
            per_table[name] = (keys, flat, rows)
        shares: dict[str, Tensor | None] = dict.fromkeys(per_table)
        if mba:
            every = torch.cat([flat + self._base[name] for name, (_, flat, _) in per_table.items()])
            c = lookup_counts(every, self.group).split([flat.numel() for _, flat, _ in per_table.values()])
            penalty = torch.zeros((), dtype=torch.float64, device=every.device)
            for (name, (_, flat, rows)), c_j in zip(per_table.items(), c):
                n = getattr(self.counts, name)[flat].clamp_min(1).double()
                per_lookup = torch.where(flat != 0, self.lam / (n * c_j.double()), 0.0)  # [M]
                shares[name] = (per_lookup * self.mba_scale).to(rows.dtype)
                penalty = penalty + 0.5 * (per_lookup * rows.detach().double().pow(2).sum(1)).sum()
            if self.group is not None and dist.get_world_size(self.group) > 1:
                dist.all_reduce(penalty, group=self.group)
            self.last_penalty = penalty
        out = {}
        for name, (keys, flat, rows) in per_table.items():
            if shares[name] is None and self.grad_scale == 1.0:
                masked = rows * (flat != 0)[:, None].to(rows.dtype)
            else:
                masked = _LookupGradient.apply(rows, flat != 0, shares[name], self.grad_scale)
            out.update(zip(keys, masked.split([ids[k].values().numel() for k in keys])))
        return out

    def forward(self, features: KeyedJaggedTensor | Mapping[str, Tensor],
                return_scores: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B]`` of a ``KeyedJaggedTensor`` batch (the keys of :func:`din_kernels.torchrec.feature_keys`,
        ``stride`` B; extra keys are ignored) or of a model batch dict (converted by :func:`to_kjt`); with
        ``return_scores`` also the behaviours' pooling weights ``[N]`` (jagged, in the order of the ``hist/``
        keys)."""
        if isinstance(features, Mapping):
            features = to_kjt(features, self.schema)
        looked: dict = {}
        for collection in self.tables.values():
            looked.update(collection(features))
        ids = features.to_dict()
        rows = self._rows(ids, looked)
        item = self.schema.item_fields
        B = features.stride()
        cat = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        ad = cat([rows[f"ad/{f.name}"] for f in item])
        if ad.shape[0] != B:
            raise ValueError(f"every 'ad/' key needs one id per sample: {B} samples, {ad.shape[0]} ids")
        hist = cat([rows[f"hist/{f.name}"] for f in item])
        offsets = ids[f"hist/{item[0].name}"].offsets()
        other = [segment_sum(rows[f"{group}/{f.name}"], ids[f"{group}/{f.name}"].offsets())
                 for group, fields in (("user", self.schema.user_fields + self.schema.user_multi_fields),
                                       ("context", self.schema.context_fields)) for f in fields]
        return self.head.forward_embedded(ad, hist, other, offsets=offsets, return_scores=return_scores)
