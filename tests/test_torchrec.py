"""DIN on TorchRec's sharded tables (din_kernels.torchrec): the KeyedJaggedTensor view of the batches, one process
against DIN (forward, every gradient, MBA through the output gradient against MBAEmbedding), 2 gloo processes
against one process step for step (row-, table- and column-wise, with and without MBA), a checkpoint of 2 ranks
loaded into 1 (a plain DIN, and a model sharded otherwise), and ``train --engine torchrec --nproc 2``.

The sharded runs are subprocesses (tests/torchrec_ranks.py under torchrun, or the training command): a crash is a
failure. Skipped as a whole only where torchrec is not installed (the TorchRec tier of .ci/run installs it)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchrec", reason="torchrec is not installed here (the TorchRec tier of .ci/run builds an "
                                       "environment with the torchrec extra and runs these tests)")

import torchrec_ranks as R  # noqa: E402
from tiny_runs import cli, outcome, source_env  # noqa: E402

from din_kernels import DIN, MBAEmbedding, load_run  # noqa: E402
from din_kernels import train as T  # noqa: E402
from din_kernels.torchrec import TorchRecModel, feature_keys, iterate_kjt, lookup_counts, to_kjt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = dict(rtol=1e-5, atol=1e-6)  # float32, another summation order


def _torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(nproc), os.path.join(HERE, "torchrec_ranks.py"), *args], capture_output=True, text=True,
                       env=dict(source_env(), OMP_NUM_THREADS="1"), timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def data():
    return R.data()


def test_kjt_view_of_padded_and_jagged_batches(data):
    idx = np.arange(0, 60, 3)
    jagged, padded = data.batch("train", idx, "jagged"), data.batch("train", idx, "padded")
    a, b = to_kjt(jagged, data.schema), to_kjt(padded, data.schema)
    assert a.keys() == b.keys() == feature_keys(data.schema)
    assert a.stride() == b.stride() == len(idx)
    assert torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())
    ids = a.to_dict()
    lengths = jagged["hist_offsets"].diff()
    for j, f in enumerate(data.schema.item_fields):  # the behaviours unpadded, the ad one id a sample
        assert torch.equal(ids[f"hist/{f.name}"].values(), jagged["hist"][:, j])
        assert torch.equal(ids[f"hist/{f.name}"].lengths(), lengths)
        assert torch.equal(ids[f"ad/{f.name}"].values(), jagged["ad"][:, j])
    tags = jagged["tags"]  # multi-hot: the 0-padding dropped
    assert torch.equal(ids["user/tags"].values(), tags[tags != 0])
    assert torch.equal(ids["user/tags"].lengths(), (tags != 0).sum(1))
    assert int(padded["hist_len"].sum()) < padded["hist"][..., 0].numel()  # the padded batch did pad
    batch = next(iterate_kjt(data, "train", 8))
    assert batch.features.stride() == 8 and batch.label.shape == (8,)


def test_lookup_counts_on_one_process():
    ids = torch.tensor([5, 3, 5, 0, 5, 9, 3])
    assert lookup_counts(ids).tolist() == [3, 2, 3, 1, 3, 1, 2]


def _one_process_pair(data, lam):
    counts = data.table_counts("train")
    din = R.din(data, lam, counts)
    return din, TorchRecModel(din, device="cpu")


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_one_process_equals_din_with_every_gradient(data, lam):
    """Unsharded (plain EmbeddingCollection): the same logits and the same gradient of every parameter as DIN; with
    MBA the tables' gradients are MBAEmbedding's (eq. 7 once per distinct id, ids shared by the ad and the
    behaviours, ids repeated, the padding id 0 of the ad and of the multi-hot tags neither trained nor regularised)."""
    din, model = _one_process_pair(data, lam)
    batch = data.batch("train", np.arange(40), "jagged")
    batch["ad"][:3] = 0  # the padding id where the ad's fields are looked up
    for m in (din, model):
        F.binary_cross_entropy_with_logits(m(batch), batch["label"]).backward()
    torch.testing.assert_close(model(batch), din(batch), rtol=0, atol=0)
    rec = dict(model.named_parameters())
    for name, table in din.tables.items():
        grad = rec[f"tables.dim{table.embedding_dim}.embeddings.{name}.weight"].grad
        torch.testing.assert_close(grad, table.weight.grad, **TOL)
        assert not grad[0].any()
    for name, p in din.named_parameters():
        if not name.startswith("tables."):
            torch.testing.assert_close(rec[f"head.{name}"].grad, p.grad, **TOL)
    assert float(model.mba_penalty()) == pytest.approx(float(din.mba_penalty()), rel=1e-6)
    if lam:  # the term is there and of weight: without it the gradients differ
        plain = R.din(data)
        F.binary_cross_entropy_with_logits(plain(batch), batch["label"]).backward()
        assert (plain.tables["goods_id"].weight.grad - din.tables["goods_id"].weight.grad).abs().max() > 1e-4
        assert float(model.mba_penalty()) > 0


def test_mba_output_gradient_route_equals_mbaembedding_on_one_table():
    """Eq. 7 for one table looked up by two keys (an id repeated within and across them, the padding id 0): the
    sum over each id's lookups of ``lam * W_j / (n_j c_j)`` added to their output gradient, against MBAEmbedding's
    fused backward, for random output gradients."""
    from din_kernels.nn.din import FeatureSchema, Field

    torch.manual_seed(3)
    schema = FeatureSchema(item_fields=(Field("goods", 12, 8),))
    counts = torch.tensor([0, 4, 1, 7, 2, 2, 9, 1, 3, 5, 1, 6])
    din = DIN(schema, mba_lambda=0.9, counts={"goods": counts}, backend="torch")
    model = TorchRecModel(din, device="cpu")
    batch = {"ad": torch.tensor([[3], [0], [5]]), "hist": torch.tensor([[3], [3], [7], [0], [5], [11], [3]]),
             "hist_offsets": torch.tensor([0, 3, 5, 7])}
    table = MBAEmbedding(12, 8, counts, 0.9, padding_idx=0, _weight=din.tables["goods"].weight.detach().clone())
    ad, hist = table(batch["ad"][:, 0], batch["hist"][:, 0])
    g_ad, g_hist = torch.randn_like(ad), torch.randn_like(hist)
    torch.autograd.backward([ad, hist], [g_ad, g_hist])
    kjt = to_kjt(batch, schema)
    looked = model.tables["dim8"](kjt)
    rows = model._rows(kjt.to_dict(), looked)
    torch.autograd.backward([rows["ad/goods"], rows["hist/goods"]], [g_ad, g_hist])
    grad = model.tables["dim8"].embeddings["goods"].weight.grad
    torch.testing.assert_close(grad, table.weight.grad, **TOL)
    assert not grad[0].any() and not grad[[1, 2, 4, 6, 8, 9, 10]].any()  # rows not in the batch untouched


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The 2-process runs of tests/torchrec_ranks.py (every case of R.CASES, then the checkpoint)."""
    out = tmp_path_factory.mktemp("sharded")
    _torchrun(2, "steps", str(out))
    return out


def _single_process(data, lam):
    """R.STEPS SGD steps of one process on the same global batches: ``[(loss, grads, tables after the step,
    penalty)]``."""
    model = R.din(data, lam, data.table_counts("train") if lam else None)
    opt = torch.optim.SGD(model.parameters(), lr=R.LR)
    steps = []
    for step, batch in enumerate(data.iterate("train", 2 * R.BATCH, shuffle=True, seed=7, drop_last=True,
                                              layout="jagged")):
        if step == R.STEPS:
            break
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if not k.startswith("tables.")}
        opt.step()
        tables = {k: p.detach().clone() for k, p in model.named_parameters() if k.startswith("tables.")}
        steps.append((float(loss.detach()), grads, tables, float(model.mba_penalty())))
    return steps, model


@pytest.mark.parametrize("case", list(R.CASES))
def test_two_ranks_follow_one_process(data, sharded, case):
    sharding, lam = R.CASES[case]
    record = torch.load(sharded / f"{case}.pt", weights_only=True)
    single, _ = _single_process(data, lam)
    assert len(record) == len(single) == R.STEPS
    init = {k: p.detach() for k, p in R.din(data).named_parameters() if k.startswith("tables.")}
    for step, (got, (loss, grads, tables, penalty)) in enumerate(zip(record, single)):
        assert got["loss"] == pytest.approx(loss, rel=1e-5), step
        assert got["grads"].keys() == grads.keys()
        for k, g in grads.items():
            torch.testing.assert_close(got["grads"][k], g, **TOL, msg=lambda m, k=k, step=step: f"step {step} {k}: {m}")
        assert got["tables"].keys() == tables.keys()
        for k, w in tables.items():
            torch.testing.assert_close(got["tables"][k], w, **TOL,
                                       msg=lambda m, k=k, step=step: f"step {step} {k}: {m}")
        assert got["penalty"] == pytest.approx(penalty, rel=1e-5, abs=1e-12)
    # the tables did train, and MBA did change them
    moved = (record[-1]["tables"]["tables.goods_id.weight"] - init["tables.goods_id.weight"]).abs().max()
    assert moved > 1e-4
    if lam:
        unregularised = _single_process(data, 0.0)[0][-1][2]["tables.goods_id.weight"]
        assert (record[-1]["tables"]["tables.goods_id.weight"] - unregularised).abs().max() > 1e-3
        assert record[-1]["penalty"] > 0


def test_checkpoint_of_two_ranks_loads_into_one(data, sharded, tmp_path):
    """The last case's checkpoint (2 ranks, row-wise) into a plain DIN on this process (no TorchRec, the
    single-process names), and into a model sharded table-wise over 1 rank: both the state after the steps."""
    import torch.distributed.checkpoint as dcp

    last = torch.load(sharded / f"{list(R.CASES)[-1]}.pt", weights_only=True)[-1]["tables"]
    _, trained = _single_process(data, R.CASES[list(R.CASES)[-1]][1])
    din = R.din(data)
    state = {"model": din.state_dict()}
    dcp.load(state, checkpoint_id=str(sharded / "checkpoint"))
    din.load_state_dict(state["model"])
    for k, v in din.state_dict().items():
        expected = last[k] if k in last else trained.state_dict()[k]
        torch.testing.assert_close(v, expected, **TOL, msg=lambda m, k=k: f"{k}: {m}")
    assert torch.equal(din.tables["goods_id"].counts, data.table_counts("train")["goods_id"])
    _torchrun(1, "load", str(sharded / "checkpoint"), str(tmp_path / "one.pt"))
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert one.keys() == din.state_dict().keys()
    for k, v in din.state_dict().items():
        assert torch.equal(one[k], v), k


def test_engine_settings_are_checked(tmp_path):
    from tiny_runs import tiny_config

    with pytest.raises(T.ConfigError, match=r"^optimizer: .*no fused adam"):
        T.train(tiny_config(tmp_path, engine="torchrec", optimizer="adam"))
    with pytest.raises(T.ConfigError, match=r"^sharding: must be one of"):
        tiny_config(tmp_path, engine="torchrec", sharding="diagonal")
    with pytest.raises(T.ConfigError, match=r"^nproc: 2 processes were asked for"):
        T.train(tiny_config(tmp_path, nproc=2))
    assert not (tmp_path / "model.pt").exists()


def test_train_command_two_ranks_match_one_process(tmp_path):
    """``train --engine torchrec --nproc 2`` (row-wise, MBA, SGD) ends with the model of ``train`` on one process
    with the global batch; its outputs are those of today's command, and its sharded last state loads into a DIN."""
    import torch.distributed.checkpoint as dcp

    common = ["train", "--model", "din", "--synthetic-users", "150", "--epochs", "2", "--max-steps", "5",
              "--mba-lambda", "0.5", "--backend", "torch", "--optimizer", "sgd", "--lr", "0.1", "--no-progress",
              "--threads", "1"]
    one = cli(*common, "--batch-size", "32", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(*common, "--batch-size", "16", "--engine", "torchrec", "--nproc", "2", "--out", str(tmp_path / "two"),
              timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("one", "two"))
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ma, mb = (json.load(open(tmp_path / name / "metrics.json")) for name in ("one", "two"))
    assert mb["world_size"] == 2 and mb["steps"] == ma["steps"] == 5
    assert mb.keys() == ma.keys()
    assert mb["test_auc"] == pytest.approx(ma["test_auc"], abs=1e-4)
    assert len(mb["history"]["train_loss"]) == 5  # rank 0's own loss, as with DDP
    np.testing.assert_allclose(mb["history"]["mba_penalty"], ma["history"]["mba_penalty"], rtol=1e-4)
    for png in ("curves.png", "attention.png"):
        assert (tmp_path / "two" / png).exists()
    run = load_run(str(tmp_path / "two"))
    assert isinstance(run.model, DIN) and run.config["engine"] == "torchrec"
    # the sharded state of the last epoch (2 ranks) loads into one plain DIN
    last = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    din = DIN(run.schema, backend="torch")
    state = {"model": din.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "two" / last["sharded"]))
    for k, v in state["model"].items():
        torch.testing.assert_close(v, b["model"][k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    # --resume of the finished run reads the sharded state back (the model, the optimizers, the selected model)
    # on 2 new ranks and reports the same result
    again = cli("train", "--out", str(tmp_path / "two"), "--resume", "--no-progress", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert outcome(json.load(open(tmp_path / "two" / "metrics.json"))) == outcome(mb)
    assert [p.name for p in (tmp_path / "two").glob("last.e*.dcp")] == [last["sharded"]]
