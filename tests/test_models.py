"""DIN and BaseModel: the paper's formulas by hand, padded == jagged, backends, MBA, one lookup per table."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from din_kernels import DIN, BaseModel, MBAEmbedding
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic
from din_kernels.nn.din import FeatureSchema, Field

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def data():
    return generate_synthetic(SyntheticConfig.tiny(seed=3), max_len=8)


def _batch(data, n=12, layout="padded"):
    idx = np.arange(n) * 7 % data.num_samples("train")
    b = data.batch("train", idx, layout)
    return b


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-2))


def _manual_forward(model, batch):
    """The paper's model written out with plain torch ops on the model's parameters (padded batch)."""
    s = model.schema
    emb = lambda name, ids: F.embedding(ids, model.tables[name].weight)
    ad = torch.cat([emb(f.name, batch["ad"][:, j]) for j, f in enumerate(s.item_fields)], -1)
    hist = torch.cat([emb(f.name, batch["hist"][..., j]) for j, f in enumerate(s.item_fields)], -1)
    mask = torch.arange(hist.shape[1])[None, :] < batch["hist_len"][:, None]
    if isinstance(model, DIN):
        att = model.attention
        q = ad[:, None, :].expand_as(hist)
        h = torch.cat([q, hist, q - hist, q * hist], -1)
        for layer, act in zip(att.layers[:-1], att.activations):
            h = layer(h)
            h = torch.where(h > 0, h, act.weight * h)  # PReLU per channel of the last dim
        w = att.layers[-1](h).squeeze(-1) * mask
    else:
        w = mask.to(hist.dtype)
    pooled = (w[..., None] * hist).sum(1)
    other = [emb(f.name, batch["user"][:, j]) for j, f in enumerate(s.user_fields)]
    other += [emb(f.name, batch[f.name]).sum(1) for f in s.user_multi_fields]
    other += [emb(f.name, batch["context"][:, j]) for j, f in enumerate(s.context_fields)]
    h = torch.cat([*other, pooled, ad], -1)
    for layer, act in zip(model.mlp, model.mlp_acts):
        h = act(layer(h))
    return model.out(h).squeeze(-1)


@pytest.mark.parametrize("cls", [DIN, BaseModel])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_the_formulas(data, cls, dtype):
    torch.manual_seed(0)
    model = cls(data.schema, mlp_hidden=(16, 8), activation="prelu", embed_init_std=0.5, backend="torch").to(dtype)
    model.eval()
    batch = _batch(data)
    got = model(batch)
    assert got.shape == (12,) and got.dtype == dtype
    assert _rel(got, _manual_forward(model, batch)) <= TOL[dtype]


@pytest.mark.parametrize("cls", [DIN, BaseModel])
@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_padded_and_jagged_agree(data, cls, activation):
    torch.manual_seed(1)
    model = cls(data.schema, mlp_hidden=(16, 8), activation=activation, embed_init_std=0.5, backend="torch").double()
    for train in (True, False):
        model.train(train)
        outs, grads = [], []
        for layout in ("padded", "jagged"):
            state = {k: v.clone() for k, v in model.state_dict().items()}
            model.zero_grad()
            out, w = model(_batch(data, 16, layout), return_scores=True)
            out.sum().backward()
            outs.append(out)
            grads.append([p.grad.clone() for p in model.parameters()])
            model.load_state_dict(state)  # undo Dice running-statistics updates
        assert _rel(outs[1], outs[0]) <= 1e-10
        for g_jag, g_pad in zip(grads[1], grads[0]):
            assert _rel(g_jag, g_pad) <= 1e-10


def test_backend_switch_reaches_every_op(data):
    torch.manual_seed(2)
    ref = DIN(data.schema, mlp_hidden=(16, 8), activation="dice", embed_init_std=0.5, backend="reference").double()
    fast = DIN(data.schema, mlp_hidden=(16, 8), activation="dice", embed_init_std=0.5, backend="torch").double()
    fast.load_state_dict(ref.state_dict())
    assert all(m.backend == "torch" for m in fast.modules() if hasattr(m, "backend"))
    assert {m.backend for m in ref.modules() if not isinstance(m, MBAEmbedding) and hasattr(m, "backend")} == {
        "reference"}
    batch = _batch(data, 20)
    out_r, out_f = ref(batch), fast(batch)
    out_r.square().sum().backward()
    out_f.square().sum().backward()
    assert _rel(out_f, out_r) <= 1e-10
    for (name, p_r), p_f in zip(ref.named_parameters(), fast.parameters()):
        assert _rel(p_f.grad, p_r.grad) <= 1e-9, name
    with pytest.raises(ValueError, match="backend"):
        DIN(data.schema, backend="tpu")


def test_one_lookup_per_table_per_step(data):
    model = DIN(data.schema, mlp_hidden=(8,), backend="torch")
    calls = {}
    for name, table in model.tables.items():
        table.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model(_batch(data))
    assert calls == {name: 1 for name in data.schema.tables()}


def test_mba_gradient_once_per_distinct_id(data):
    torch.manual_seed(3)
    counts = data.table_counts()
    lam = 0.3
    plain = DIN(data.schema, mlp_hidden=(8,), backend="torch").double()
    reg = DIN(data.schema, mlp_hidden=(8,), mba_lambda=lam, counts=counts, backend="torch").double()
    reg.load_state_dict(plain.state_dict(), strict=False)
    reg.set_mba(lam, counts)
    batch = _batch(data, 10)
    for m in (plain, reg):
        F.binary_cross_entropy_with_logits(m(batch), batch["label"].double()).backward()
    for name, ids in data.schema.lookups(batch).items():
        w = plain.tables[name].weight.detach()
        distinct = torch.unique(torch.cat([t.reshape(-1) for t in ids]))
        distinct = distinct[distinct != 0]
        n = counts[name].double().clamp_min(1)
        expected = plain.tables[name].weight.grad.clone()
        expected[distinct] += lam * w[distinct] / n[distinct, None]
        assert _rel(reg.tables[name].weight.grad, expected) <= 1e-12, name
        pen = lam / 2 * (w[distinct].square().sum(1) / n[distinct]).sum()
        assert float(reg.tables[name].last_penalty) == pytest.approx(float(pen), rel=1e-6)
    assert float(reg.mba_penalty()) > 0 and float(plain.mba_penalty()) == 0


def test_counts_are_per_sample(data):
    counts = data.table_counts()
    s = data.splits["train"]
    goods = np.zeros(data.schema.tables()["goods_id"], dtype=np.int64)
    for u, p, t in zip(s["uid"], s["pos"], s["target"]):
        seq = data.seq_values[data.seq_offsets[u]:data.seq_offsets[u] + p][-data.max_len:]
        for j in set(seq.tolist()) | {int(t)}:
            goods[j] += 1
    goods[0] = 0
    assert np.array_equal(counts["goods_id"].numpy(), goods)
    assert int(counts["slot"].sum()) == data.num_samples("train")


def test_bad_input_names_the_argument(data):
    model = BaseModel(data.schema, backend="torch")
    batch = _batch(data)
    del batch["hist_len"]
    with pytest.raises(ValueError, match="hist_len"):
        model(batch)
    with pytest.raises(ValueError, match="activation"):
        DIN(data.schema, activation="tanh")
    with pytest.raises(ValueError, match="unique"):
        FeatureSchema(item_fields=(Field("a", 5), Field("a", 5)))
    with pytest.raises(ValueError, match="vocab_size"):
        FeatureSchema(item_fields=(Field("a", 1),))
    with pytest.raises(ValueError, match="item_fields"):
        FeatureSchema(item_fields=())


def test_training_reduces_the_loss(data):
    torch.manual_seed(4)
    model = DIN(data.schema, mlp_hidden=(16, 8), backend="torch")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    batch = data.batch("train", np.arange(256))
    losses = []
    for _ in range(30):
        loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert isinstance(model.tables["goods_id"], MBAEmbedding)
