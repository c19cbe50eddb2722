"""A ``KeyedJaggedTensor`` view of the model batches of :meth:`din_kernels.data.SeqData.batch`.

One key per table lookup, named ``<group>/<field>``:

- ``ad/<f>`` and ``hist/<f>`` for each item field ``f`` (the candidate ad and the behaviours; both look up the table
  ``f``): ``ad/<f>`` has one id per sample, the ``hist/<f>`` keys hold the behaviours of every sample without padding
  (TorchRec's values + lengths; every ``hist/`` key has the same lengths);
- ``user/<f>`` for the one-hot profile fields (one id per sample) and for the multi-hot fields (the nonzero ids of
  each sample: the 0-padding is dropped), ``context/<f>`` for the context fields (one id per sample).

Id 0 stays where the padded batch has it in the one-hot keys (the ad, the behaviours, the profile and context): its
embedding is zero and gets no gradient (:class:`din_kernels.torchrec.TorchRecModel` masks it), as in the model's own
tables.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..data import SeqData
from ..nn.din import FeatureSchema


def table_features(schema: FeatureSchema) -> dict[str, list[str]]:
    """``{table (field) name: its KJT keys}``: ``[ad/f, hist/f]`` for the item fields, ``[<group>/f]`` else."""
    out = {f.name: [f"ad/{f.name}", f"hist/{f.name}"] for f in schema.item_fields}
    for f in schema.user_fields + schema.user_multi_fields:
        out[f.name] = [f"user/{f.name}"]
    for f in schema.context_fields:
        out[f.name] = [f"context/{f.name}"]
    return out


def feature_keys(schema: FeatureSchema) -> list[str]:
    """The keys of :func:`to_kjt`, in its order: the ad's item fields, the behaviours', the user's, the context's."""
    item = schema.item_fields
    return ([f"ad/{f.name}" for f in item] + [f"hist/{f.name}" for f in item]
            + [f"user/{f.name}" for f in schema.user_fields + schema.user_multi_fields]
            + [f"context/{f.name}" for f in schema.context_fields])


def to_kjt(batch: Mapping[str, Tensor], schema: FeatureSchema) -> KeyedJaggedTensor:
    """The ids of a model batch (padded ``hist`` ``[B, T, F]`` with ``hist_len`` ``[B]``, or jagged ``[N, F]`` with
    ``hist_offsets`` ``[B + 1]``) as one ``KeyedJaggedTensor`` of stride B with the keys of :func:`feature_keys`:
    values int64, lengths int64 ``[B]`` per key; a padded history loses its padding."""
    ad = batch["ad"]
    B = ad.shape[0]
    hist = batch["hist"]
    if "hist_offsets" in batch:
        offsets = batch["hist_offsets"].long()
        lengths = offsets[1:] - offsets[:-1]
    else:
        lengths = batch["hist_len"].long().clamp(0, hist.shape[1])
        hist = hist[torch.arange(hist.shape[1], device=hist.device)[None, :] < lengths[:, None]]  # [N, F]
    ones = torch.ones(B, dtype=torch.long, device=ad.device)
    values: list[Tensor] = []
    counts: list[Tensor] = []
    for j in range(len(schema.item_fields)):
        values.append(ad[:, j])
        counts.append(ones)
    for j in range(len(schema.item_fields)):
        values.append(hist[:, j])
        counts.append(lengths)
    for j in range(len(schema.user_fields)):
        values.append(batch["user"][:, j])
        counts.append(ones)
    for f in schema.user_multi_fields:
        ids = batch[f.name]
        keep = ids != 0
        values.append(ids[keep])
        counts.append(keep.sum(1))
    for j in range(len(schema.context_fields)):
        values.append(batch["context"][:, j])
        counts.append(ones)
    return KeyedJaggedTensor(keys=feature_keys(schema), values=torch.cat([v.reshape(-1).long() for v in values]),
                             lengths=torch.cat(counts), stride=B)


@dataclass
class KJTBatch:
    """One training batch for TorchRec: ``features`` (:func:`to_kjt`), ``label`` ``[B]`` float32, ``uid`` ``[B]``.
    Implements TorchRec's ``Pipelineable`` (``to``, ``record_stream``, ``pin_memory``), so its train pipelines can
    prefetch it."""

    features: KeyedJaggedTensor
    label: Tensor
    uid: Tensor

    @classmethod
    def from_batch(cls, batch: Mapping[str, Tensor], schema: FeatureSchema) -> KJTBatch:
        return cls(to_kjt(batch, schema), batch["label"], batch["uid"])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KJTBatch:
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return KJTBatch(move(self.features), move(self.label), move(self.uid))

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        self.label.record_stream(stream)
        self.uid.record_stream(stream)

    def pin_memory(self) -> KJTBatch:
        return KJTBatch(self.features.pin_memory(), self.label.pin_memory(), self.uid.pin_memory())


def iterate_kjt(data: SeqData, split: str, batch_size: int, **kw) -> Iterator[KJTBatch]:
    """:meth:`SeqData.iterate` (same arguments: shuffle, seed, rank, world_size, drop_last) as :class:`KJTBatch`es,
    built from the jagged layout."""
    kw["layout"] = "jagged"
    for batch in data.iterate(split, batch_size, **kw):
        yield KJTBatch.from_batch(batch, data.schema)
