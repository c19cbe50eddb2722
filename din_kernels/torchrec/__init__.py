"""DIN on TorchRec's sharded embedding tables: the tables of a :class:`din_kernels.DIN` (or ``BaseModel``) in
``EmbeddingCollection``s sharded row-, table- or column-wise over the ranks, the dense modules under DDP, the
batches as ``KeyedJaggedTensor``s whose jagged behaviour embeddings go to ``TargetAttention(offsets=...)`` unpadded.

Needs the ``torchrec`` extra (``pip install 'din_kernels[torchrec]'`` then ``pip install --no-deps
torchrec==1.8.0``: torchrec's own metadata asks for the CUDA build of fbgemm, the extra brings the one that matches
the installed torch); the rest of din_kernels never imports this package. ::

    import torch.distributed as dist
    from din_kernels import DIN
    from din_kernels.torchrec import TorchRecModel, dense_optimizer, shard, to_kjt

    dist.init_process_group("gloo")                     # under torchrun; nccl on GPUs
    torch.manual_seed(0)
    model = TorchRecModel(DIN(schema))                  # the tables on "meta": nothing allocated yet
    net = shard(model, "row", optimizer="sgd", lr=0.01)  # each rank allocates and fills its shards
    opt = dense_optimizer(net, "sgd", lr=0.01)
    loss = F.binary_cross_entropy_with_logits(net(to_kjt(batch, schema)), batch["label"])
    opt.zero_grad(); loss.backward(); opt.step()        # the tables are updated inside the backward

MBA (``mba_lambda``) is applied through the lookups' output gradient, exactly as :class:`din_kernels.MBAEmbedding`
applies it for the global batch (see :mod:`din_kernels.torchrec.model`). Checkpoints (:mod:`.state`) carry the
single-process model's names, so a run sharded over N ranks loads into one process, sharded or not.
"""

from .batch import KJTBatch, feature_keys, iterate_kjt, table_features, to_kjt
from .model import TorchRecModel, lookup_counts
from .sharding import SHARDINGS, dense_optimizer, shard, sharding_plan
from .state import clone_state, full_state_dict, init_tables_, load, load_state_dict_, load_tables_, save, state_dict

__all__ = [
    "KJTBatch",
    "SHARDINGS",
    "TorchRecModel",
    "clone_state",
    "dense_optimizer",
    "feature_keys",
    "full_state_dict",
    "init_tables_",
    "iterate_kjt",
    "load",
    "load_state_dict_",
    "load_tables_",
    "lookup_counts",
    "save",
    "shard",
    "sharding_plan",
    "state_dict",
    "table_features",
    "to_kjt",
]
