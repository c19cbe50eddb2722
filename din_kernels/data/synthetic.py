"""A synthetic click log where the click depends on a few relevant behaviours (DIN's local activation).

The generator, deterministic from ``seed`` (numpy's PCG64):

- **Items.** ``num_categories`` categories, each split into ``styles_per_category`` hidden styles of
  ``items_per_style`` goods: goods id ``i >= 1`` has style cluster ``(i - 1) // items_per_style`` and category
  ``cluster // styles_per_category + 1``. The category is an observed item field; the style is hidden and can only
  be learned through the goods embeddings.
- **Users.** Each user has ``interests`` (a random count in the given range) interest clusters in distinct
  categories, a one-hot gender (2 values) and age bucket (7), and 1..4 multi-hot tags (of ``num_tags``).
- **Behaviours.** ``hist_len`` (random in the range) behaviours in time order; each is, with probability
  ``1 - noise``, a random goods of a random interest cluster of the user, otherwise a random goods of any cluster.
- **Impressions.** ``samples_per_user`` candidates per user, each with the user's whole history and a context field
  ``slot`` (display position 1..5). A candidate is drawn from one of the user's interest clusters (probability
  ``p_match``), from another style of an interest's category (``p_category``), or uniformly from all goods.
- **Clicks.** ``label ~ Bernoulli(sigmoid(logit))`` with
  ``logit = bias + match_weight * [m >= 1] + extra_match_weight * [m >= 2] + category_weight * [c >= 1]
  + small profile/slot effects``, where ``m`` is how many behaviours share the candidate's style cluster and ``c``
  how many share its category in another style. The click hinges on a few relevant behaviours, whatever the rest
  of the (long, multi-interest) history holds: sum pooling blurs them with everything else, target attention can
  pick them out.
- **Splits.** Users are split ``train_frac`` / ``val_frac`` / rest into train / val / test (disjoint users).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..nn.din import FeatureSchema, Field
from .core import SeqData, make_split


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 12000
    num_categories: int = 40
    styles_per_category: int = 4
    items_per_style: int = 5
    interests: tuple[int, int] = (3, 6)
    hist_len: tuple[int, int] = (10, 40)
    noise: float = 0.2
    samples_per_user: int = 10
    p_match: float = 0.4
    p_category: float = 0.3
    bias: float = -2.0
    match_weight: float = 3.0
    extra_match_weight: float = 0.5
    category_weight: float = 0.8
    num_tags: int = 20
    embed_dim: int = 8
    train_frac: float = 0.8
    val_frac: float = 0.1
    seed: int = 0

    @classmethod
    def tiny(cls, seed: int = 0) -> SyntheticConfig:
        """A few hundred users, for tests."""
        return cls(num_users=300, num_categories=8, styles_per_category=2, items_per_style=5, hist_len=(3, 12),
                   samples_per_user=6, seed=seed)


def generate_synthetic(config: SyntheticConfig = SyntheticConfig(), max_len: int = 50) -> SeqData:
    """The dataset described in the module docstring (seconds for the default 200k impressions)."""
    c = config
    rng = np.random.default_rng(c.seed)
    U, S = c.num_users, c.styles_per_category
    n_clusters = c.num_categories * S
    n_items = n_clusters * c.items_per_style
    cate_of = np.concatenate([[0], np.arange(n_items) // (c.items_per_style * S) + 1])
    item_feats = np.stack([np.arange(n_items + 1), cate_of], 1).astype(np.int64)

    # users: interest clusters in distinct categories
    k_max = c.interests[1]
    if k_max > c.num_categories:
        raise ValueError(f"interests upper bound {k_max} exceeds num_categories {c.num_categories}")
    n_int = rng.integers(c.interests[0], c.interests[1] + 1, size=U)
    cats = np.argsort(rng.random((U, c.num_categories)), 1)[:, :k_max]
    interest = cats * S + rng.integers(0, S, size=(U, k_max))  # [U, k_max] cluster ids, first n_int valid

    # behaviours
    lengths = rng.integers(c.hist_len[0], c.hist_len[1] + 1, size=U)
    offsets = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    owner = np.repeat(np.arange(U), lengths)
    pick = (rng.random(owner.size) * n_int[owner]).astype(np.int64)
    cluster = np.where(rng.random(owner.size) < c.noise, rng.integers(0, n_clusters, owner.size),
                       interest[owner, pick])
    seq_values = cluster * c.items_per_style + rng.integers(0, c.items_per_style, owner.size) + 1
    hist_cluster = np.zeros((U, n_clusters), dtype=np.int64)
    np.add.at(hist_cluster, (owner, cluster), 1)
    hist_cate = hist_cluster.reshape(U, c.num_categories, S).sum(2)

    # impressions
    uid = np.repeat(np.arange(U), c.samples_per_user)
    n = uid.size
    kind = rng.random(n)
    own = interest[uid, (rng.random(n) * n_int[uid]).astype(np.int64)]
    other_style = (own // S) * S + (own % S + rng.integers(1, S, n)) % S if S > 1 else own
    target_cluster = np.where(kind < c.p_match, own,
                              np.where(kind < c.p_match + c.p_category, other_style, rng.integers(0, n_clusters, n)))
    target = target_cluster * c.items_per_style + rng.integers(0, c.items_per_style, n) + 1
    m = hist_cluster[uid, target_cluster]
    cat_other = hist_cate[uid, target_cluster // S] - m

    gender = rng.integers(1, 3, size=U)
    age = rng.integers(1, 8, size=U)
    n_tags = rng.integers(1, 5, size=U)
    tags = np.argsort(rng.random((U, c.num_tags)), 1)[:, :4] + 1
    tags[np.arange(4)[None, :] >= n_tags[:, None]] = 0
    slot = rng.integers(1, 6, size=n)
    tag_effect = rng.normal(0, 0.2, c.num_tags + 1)
    tag_effect[0] = 0
    logit = (c.bias + c.match_weight * (m >= 1) + c.extra_match_weight * (m >= 2) + c.category_weight * (cat_other >= 1)
             + 0.2 * (gender[uid] == 1) + 0.05 * (age[uid] - 4) + tag_effect[tags[uid]].sum(1) - 0.15 * (slot - 1))
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)

    # user split
    order = rng.permutation(U)
    n_train, n_val = int(round(c.train_frac * U)), int(round(c.val_frac * U))
    split_of = np.empty(U, dtype=np.int64)
    split_of[order[:n_train]], split_of[order[n_train:n_train + n_val]], split_of[order[n_train + n_val:]] = 0, 1, 2
    splits = {}
    for k, name in enumerate(("train", "val", "test")):
        sel = split_of[uid] == k
        splits[name] = make_split(uid[sel], lengths[uid[sel]], target[sel], label[sel], slot[sel, None])

    d = c.embed_dim
    schema = FeatureSchema(
        item_fields=(Field("goods_id", n_items + 1, d), Field("cate_id", c.num_categories + 1, d)),
        user_fields=(Field("gender", 3, 4), Field("age", 8, 4)),
        user_multi_fields=(Field("tags", c.num_tags + 1, 4),),
        context_fields=(Field("slot", 6, 4),),
    )
    info = {"dataset": "synthetic", "config": asdict(c), "ctr": float(label.mean())}
    return SeqData(schema, max_len, item_feats, seq_values.astype(np.int64), offsets,
                   np.stack([gender, age], 1).astype(np.int64), {"tags": tags.astype(np.int64)}, splits, info)
