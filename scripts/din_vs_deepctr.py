"""Training throughput of din_kernels' DIN and DeepCTR-Torch 0.3.0's DIN on the same synthetic data, side by side
in one process: the same batches (built beforehand), the same batch size, matched architecture (embeddings of 8
per item field, attention MLP (36,) with PReLU, MLP (200, 80) with PReLU, Adam), timing forward + backward +
optimizer step only.

    python scripts/din_vs_deepctr.py [--steps 150] [--batch-size 256] [--threads 1] [--backend auto]
        [--att-hidden 36] [--att-activation prelu]

(``--att-hidden 80 40 --att-activation sigmoid`` is the original code's / DeepCTR-Torch's attention MLP.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
from deepctr_torch.models import DIN as DeepCTRDIN

from din_kernels import DIN
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic


def deepctr_model(data, max_len: int, att_hidden, att_activation: str):
    s = data.schema
    v = {f.name: f for f in s.all_fields()}
    cols = [SparseFeat(n, v[n].vocab_size, v[n].embed_dim) for n in ("gender", "age", "slot", "goods_id", "cate_id")]
    cols.append(VarLenSparseFeat(SparseFeat("tags", v["tags"].vocab_size, v["tags"].embed_dim), maxlen=4,
                                 combiner="sum"))
    for n in ("goods_id", "cate_id"):
        cols.append(VarLenSparseFeat(SparseFeat(f"hist_{n}", v[n].vocab_size, v[n].embed_dim, embedding_name=n),
                                     maxlen=max_len, length_name="seq_length"))
    return DeepCTRDIN(cols, ["goods_id", "cate_id"], dnn_hidden_units=(200, 80), dnn_activation="prelu",
                      att_hidden_size=tuple(att_hidden), att_activation=att_activation, l2_reg_embedding=0.0,
                      device="cpu")


def deepctr_input(model, batch, max_len: int) -> torch.Tensor:
    hist, T = batch["hist"], batch["hist"].shape[1]
    padded = torch.zeros(hist.shape[0], max_len, 2, dtype=torch.long)
    padded[:, :T] = hist
    parts = {"gender": batch["user"][:, :1], "age": batch["user"][:, 1:2], "slot": batch["context"][:, :1],
             "goods_id": batch["ad"][:, :1], "cate_id": batch["ad"][:, 1:2], "tags": batch["tags"],
             "hist_goods_id": padded[..., 0], "hist_cate_id": padded[..., 1], "seq_length": batch["hist_len"][:, None]}
    order = sorted(model.feature_index, key=lambda k: model.feature_index[k][0])
    return torch.cat([parts[k] for k in order], 1).float()


def timed(step, batches, warmup: int = 10) -> float:
    for b in batches[:warmup]:
        step(b)
    t = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    return sum(len(b[-1]) for b in batches[warmup:]) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--att-hidden", type=int, nargs="+", default=[36])
    p.add_argument("--att-activation", default="prelu", choices=("sigmoid", "relu", "prelu"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = generate_synthetic(SyntheticConfig())
    max_len = data.info["config"]["hist_len"][1]
    batches = []
    for i, b in enumerate(data.iterate("train", args.batch_size, shuffle=True, drop_last=True)):
        if i == args.steps:
            break
        batches.append(b)

    torch.manual_seed(0)
    ours = DIN(data.schema, mlp_hidden=(200, 80), activation="prelu", att_hidden=args.att_hidden,
               att_activation=args.att_activation, backend=args.backend)
    peer = deepctr_model(data, max_len, args.att_hidden, args.att_activation)
    opt_o, opt_p = torch.optim.Adam(ours.parameters(), 1e-3), torch.optim.Adam(peer.parameters(), 1e-3)
    ours_in = [(b, b["label"]) for b in batches]
    peer_in = [(deepctr_input(peer, b, max_len), b["label"]) for b in batches]

    def step_ours(item):
        b, y = item
        loss = F.binary_cross_entropy_with_logits(ours(b), y)
        opt_o.zero_grad()
        loss.backward()
        opt_o.step()

    def step_peer(item):
        x, y = item
        loss = F.binary_cross_entropy(peer(x).squeeze(-1), y)
        opt_p.zero_grad()
        loss.backward()
        opt_p.step()

    rates = {"din_kernels DIN": [], "DeepCTR-Torch DIN": []}
    for _ in range(2):  # interleaved, so both see the same machine load
        rates["din_kernels DIN"].append(timed(step_ours, ours_in))
        rates["DeepCTR-Torch DIN"].append(timed(step_peer, peer_in))
    print(f"attention MLP {tuple(args.att_hidden)} {args.att_activation}, batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} thread(s), "
          f"mean history {np.mean([b['hist_len'].float().mean() for b in batches]):.1f}")
    for name, r in rates.items():
        print(f"{name:<18} {max(r):>10,.0f} samples/s (best of {len(r)})")
    print(f"speed-up {max(rates['din_kernels DIN']) / max(rates['DeepCTR-Torch DIN']):.2f}x")


if __name__ == "__main__":
    main()
