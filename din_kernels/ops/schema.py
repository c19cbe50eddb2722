"""The one contract of every op family: each op's ``torch.library`` schema, written once.

Every kernel backend registers the same schema under its own name, ``din_kernels::<op><suffix>``: ``_reference``,
``_torch`` and ``_triton`` from Python (``torch.library.custom_op`` / ``triton_op`` with ``schema=``), and the compiled
extension (``csrc/``) with no suffix, one C++ op holding both a CPU and a CUDA kernel. ``setup.py`` writes these strings
into ``csrc/generated/schemas.h`` for ``csrc/register.cpp`` (``m.def("<op>" SCHEMA)``), so the C++ and Python
schemas cannot drift apart. This module imports nothing: ``setup.py`` reads it without importing the package.

Conventions shared by all families: every output is a fresh tensor (no aliases); computation is in float32 (float64
for float64 inputs) and outputs come in the input dtypes, but the tensors called "compute dtype" below; a value that
a backend does not produce is an empty tensor of the documented dtype, never omitted, so every backend returns and
saves the same tensors.

Target attention (SPEC section 1)

``target_attention_fwd``: ``query`` [B, D]; ``keys`` [B, T, D] with ``lengths`` [B], or [N, D] with ``offsets``
[B + 1] (exactly one of the two); ``weights``/``biases`` the ``nn.Linear`` layers ``[H1, 4D], ..., [1, Hn]``;
``act_weights`` the PReLU weights or Dice alphas (one ``[H_i]`` or ``[1]`` per hidden layer; sigmoid/relu:
none, or one empty tensor per hidden layer, the form an AOTInductor package passes);
``act_means``/``act_vars`` the Dice running statistics (used in eval; never written by the op: the caller updates
them from ``dice_stats``); ``activation`` sigmoid | relu | prelu | dice; ``normalization`` none | softmax (of
``scale * s``); ``eps`` Dice's. Returns

- ``out`` [B, D] and ``scores`` ([B, T] padded, [N] jagged) in ``query``'s dtype;
- ``dice_stats`` [3, H1 + ... + Hn] in the compute dtype: per hidden channel the batch mean, biased variance and
  valid-position count (repeated) in Dice training, else [3, 0];
- ``scores_acc`` (``scores``' shape) and ``out_acc`` [B, D] in the compute dtype under softmax (what the backward's
  ``delta_b = sum_t w_t dw_t`` needs exactly, whatever the storage dtype), else empty [0] and [0, D];
- ``z1`` the first layer's pre-activation ([B, T, H1] or [N, H1], compute dtype) when ``save_z1`` and the backend
  keeps it (the ``torch`` backend: it saves the dominant matmul of the backward), else empty [0].

``target_attention_bwd`` takes the output gradients (either may be None), the forward's inputs and its last four
outputs, and returns the gradients of ``query``, ``keys``, ``weights``, ``biases`` and ``act_weights`` in their dtypes.
A backward given an empty ``z1`` recomputes it.

Several candidates per history (serving; sampled negatives in training): with ``query_offsets`` [U + 1] (a partition
of the Nq query rows), ``query`` is [Nq, D], the candidates of user u are rows ``query_offsets[u] ..
query_offsets[u + 1]``, and keys/lengths/offsets describe the U users. Every output is that of the op on each user's
history repeated once per candidate: ``out`` [Nq, D]; ``scores`` [Nq, T] padded, or jagged [sum_i L_u(i)] in
candidate order (candidate i's L_u(i) scores contiguous); ``dice_stats`` over the repeated behaviours; the keys'
gradient sums over each user's candidates. A backend reads each user's keys once (for a tile of candidates) and never
builds the repeated history.

Dice (SPEC section 2)

``dice_fwd``: ``x`` [..., C], ``mask`` x.shape[:-1] bool or None, ``alpha`` [C] or [1], ``weight``/``bias`` [C]
or None (affine), running statistics [C] (read in eval only). Returns ``y`` (x's shape and dtype) and ``stats`` [3, C]
in the compute dtype: batch mean, biased variance and count in training, the running statistics and count 0 in eval.
``dice_bwd`` returns the gradients of ``x``, ``alpha``, ``weight`` and ``bias`` (the last two empty [0] without
affine). ``dice_update_running`` updates the running statistics in place from ``stats`` like ``nn.BatchNorm1d``
(unbiased variance); channels whose batch had no position, or whose statistics are not finite, keep their values.

Mini-batch aware L2 (SPEC section 3)

``weight`` [K, D]; ``ids`` any shape, int32/int64 (every lookup of the table in the step); ``counts`` [K] (clamped to
at least 1). ``mba_l2_dense`` adds ``lam * W[j] / n[j]`` to ``grad`` [K, D] in place once per distinct id j
(j != padding_idx) and returns the penalty ``lam / 2 * sum_j ||W[j]||^2 / n[j]`` (0-dim, weight's dtype);
``mba_penalty`` returns that penalty alone. ``mba_embedding`` is the lookup ``weight[ids]`` (ids.shape + [D]) whose
backward is ``mba_embedding_bwd_dense`` (``grad_out`` [M, D] of the M = ids.numel() lookups -> the table's gradient
[K, D] plus the MBA term, zero outside the batch's rows) or, with ``sparse``, ``mba_embedding_bwd_sparse``
(-> ``indices`` [M] int64 and ``values`` [M, D]: an uncoalesced COO gradient whose entries summed per id are the same
rows). Ids outside [0, K) (possible only with the checks off) are never read or written.
"""

ATTENTION_FWD = (
    "(Tensor query, Tensor keys, Tensor? lengths, Tensor? offsets, Tensor? query_offsets, Tensor[] weights, "
    "Tensor[] biases, Tensor[] act_weights, Tensor[] act_means, Tensor[] act_vars, str activation, "
    "str normalization, float scale, bool training, float eps, bool save_z1) "
    "-> (Tensor out, Tensor scores, Tensor dice_stats, Tensor scores_acc, Tensor out_acc, Tensor z1)"
)
ATTENTION_BWD = (
    "(Tensor? grad_out, Tensor? grad_scores, Tensor query, Tensor keys, Tensor? lengths, Tensor? offsets, "
    "Tensor? query_offsets, Tensor[] weights, Tensor[] biases, Tensor[] act_weights, Tensor[] act_means, "
    "Tensor[] act_vars, "
    "Tensor dice_stats, Tensor scores_acc, Tensor out_acc, Tensor z1, str activation, str normalization, "
    "float scale, bool training, float eps) "
    "-> (Tensor grad_query, Tensor grad_keys, Tensor[] grad_weights, Tensor[] grad_biases, "
    "Tensor[] grad_act_weights)"
)
DICE_FWD = (
    "(Tensor x, Tensor? mask, Tensor alpha, Tensor? weight, Tensor? bias, Tensor? running_mean, "
    "Tensor? running_var, bool training, float eps) -> (Tensor y, Tensor stats)"
)
DICE_BWD = (
    "(Tensor grad_y, Tensor x, Tensor? mask, Tensor alpha, Tensor? weight, Tensor? bias, Tensor stats, "
    "bool training, float eps) -> (Tensor grad_x, Tensor grad_alpha, Tensor grad_weight, Tensor grad_bias)"
)
DICE_UPDATE_RUNNING = "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor stats, float momentum) -> ()"
MBA_L2_DENSE = (
    "(Tensor weight, Tensor(a!) grad, Tensor ids, Tensor counts, float lam, int? padding_idx) -> Tensor"
)
MBA_PENALTY = "(Tensor weight, Tensor ids, Tensor counts, float lam, int? padding_idx) -> Tensor"
MBA_EMBEDDING = (
    "(Tensor weight, Tensor ids, Tensor counts, float lam, int? padding_idx, bool sparse) -> Tensor"
)
MBA_EMBEDDING_BWD_DENSE = (
    "(Tensor grad_out, Tensor ids, Tensor weight, Tensor counts, float lam, int? padding_idx) -> Tensor"
)
MBA_EMBEDDING_BWD_SPARSE = (
    "(Tensor grad_out, Tensor ids, Tensor weight, Tensor counts, float lam, int? padding_idx) "
    "-> (Tensor indices, Tensor values)"
)

# op name (without a backend suffix) -> schema; the compiled extension defines the ones in COMPILED
SCHEMAS = {
    "target_attention_fwd": ATTENTION_FWD,
    "target_attention_bwd": ATTENTION_BWD,
    "dice_fwd": DICE_FWD,
    "dice_bwd": DICE_BWD,
    "dice_update_running": DICE_UPDATE_RUNNING,
    "mba_l2_dense": MBA_L2_DENSE,
    "mba_penalty": MBA_PENALTY,
    "mba_embedding": MBA_EMBEDDING,
    "mba_embedding_bwd_dense": MBA_EMBEDDING_BWD_DENSE,
    "mba_embedding_bwd_sparse": MBA_EMBEDDING_BWD_SPARSE,
}

# the ops of the compiled extension (csrc/register.cpp defines these; its CPU and CUDA kernels implement them; the
# MBA ops have CUDA kernels only)
COMPILED = ("target_attention_fwd", "target_attention_bwd", "dice_fwd", "dice_bwd", "dice_update_running",
            "mba_l2_dense", "mba_penalty", "mba_embedding", "mba_embedding_bwd_dense", "mba_embedding_bwd_sparse")
