"""Mini-batch aware L2 (SPEC section 3): ``mba_l2_`` (dense and sparse grads) and ``MBAEmbedding`` of the torch and
triton backends against the float64 reference, ``mba_counts``, the ops' registration, bad input. Triton runs on the
CPU under TRITON_INTERPRET=1 (conftest)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import din_kernels as dk
from din_kernels.reference.mba import mba_l2_ref
from din_kernels.triton import mba as triton_mba

BACKENDS = ["torch", "triton"]
K, D = 23, 7


def make_case(seed=0, dtype=torch.float64, K=K, D=D):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(K, D, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(K, D, generator=g, dtype=torch.float64).to(dtype)
    # id 5 many times, id 0 (the padding id in some tests), a zero count (clamped to 1)
    ids = torch.tensor([[5, 3, 5, 0, 11], [5, 5, 5, 17, 3], [22, 5, 0, 0, 9]])
    counts = torch.randint(0, 6, (K,), generator=g)
    counts[3] = 0
    return weight, grad, ids, counts


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_dense_matches_reference(backend, padding_idx):
    weight, grad, ids, counts = make_case(1)
    want, want_penalty = mba_l2_ref(weight, grad, ids, counts, 0.3, padding_idx)
    got = grad.clone()
    out, penalty = dk.mba_l2_(weight, got, ids, counts, 0.3, padding_idx, backend=backend)
    assert out is got, "a dense grad is updated in place and returned"
    assert_close(got, want, torch.float64, "grad")
    assert_close(penalty, want_penalty, torch.float64, "penalty")
    assert penalty.dim() == 0
    touched = torch.zeros(K, dtype=torch.bool)
    touched[ids.unique()] = True
    if padding_idx is not None:
        touched[padding_idx] = False
        assert torch.equal(got[padding_idx], grad[padding_idx])
    assert torch.equal(got[~touched], grad[~touched])
    # id 5 occurs 7 times but gets the term once; id 3 has count 0, clamped to 1
    assert_close(got[5] - grad[5], 0.3 * weight[5] / counts[5].clamp_min(1), torch.float64, "row 5")
    assert_close(got[3] - grad[3], 0.3 * weight[3], torch.float64, "row 3")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_sparse_matches_reference(backend, padding_idx, poison):
    weight, grad, ids, counts = make_case(2)
    want, want_penalty = mba_l2_ref(weight, grad, ids, counts, 0.5, padding_idx)
    sparse = grad.to_sparse(1)
    out, penalty = dk.mba_l2_(weight, sparse, ids, counts, 0.5, padding_idx, backend=backend)
    assert out.is_sparse and out.is_coalesced()
    assert_close(out.to_dense(), want, torch.float64, "grad")
    assert_close(penalty, want_penalty, torch.float64, "penalty")
    empty_grad = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), torch.empty(0, D, dtype=torch.float64),
                                         (K, D), check_invariants=True)
    added, _ = dk.mba_l2_(weight, empty_grad, ids, counts, 0.5, padding_idx, backend=backend)
    n_distinct = ids.unique().numel() - (padding_idx is not None)
    assert added._nnz() == n_distinct, "one row per distinct id, none for the padding id"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(backend, dtype):
    weight, grad, ids, counts = make_case(3, dtype)
    want, want_penalty = mba_l2_ref(weight.double(), grad.double(), ids, counts, 0.7, 0)
    got = grad.clone()
    _, penalty = dk.mba_l2_(weight, got, ids.int(), counts, 0.7, 0, backend=backend)
    assert got.dtype == dtype and penalty.dtype == dtype
    assert_close(got, want, dtype, "grad")
    assert_close(penalty, want_penalty, dtype, "penalty")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_batch(backend):
    weight, grad, _, counts = make_case(4)
    ids = torch.empty(0, 5, dtype=torch.long)
    got = grad.clone()
    _, penalty = dk.mba_l2_(weight, got, ids, counts, 0.3, backend=backend)
    assert torch.equal(got, grad) and float(penalty) == 0.0
    sparse, penalty = dk.mba_l2_(weight, grad.to_sparse(1), ids, counts, 0.3, backend=backend)
    assert torch.equal(sparse.to_dense(), grad) and float(penalty) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_rows_outside_the_batch_are_neither_read_nor_written(backend, sparse):
    """NaN in every row of weight and grad outside the batch: they stay NaN, every result stays finite."""
    weight, grad, ids, counts = make_case(5)
    outside = torch.ones(K, dtype=torch.bool)
    outside[ids.unique()] = False
    weight[outside] = float("nan")
    counts[outside] = -(2**40)  # nonsense counts outside the batch too
    want, want_penalty = mba_l2_ref(weight, grad, ids, counts, 0.3, 0)
    if sparse:
        out, penalty = dk.mba_l2_(weight, torch.zeros(K, D, dtype=weight.dtype).to_sparse(1), ids, counts, 0.3, 0,
                                  backend=backend)
        assert torch.isfinite(out.values()).all()
        assert not out.to_dense()[outside].any(), "rows outside the batch were written"
        assert_close(out.to_dense()[~outside], (want - grad)[~outside], torch.float64, "grad")
    else:
        grad[outside] = float("nan")
        got = grad.clone()
        _, penalty = dk.mba_l2_(weight, got, ids, counts, 0.3, 0, backend=backend)
        assert torch.isnan(got[outside]).all(), "rows outside the batch were written"
        assert_close(got[~outside], want[~outside], torch.float64, "grad")
    assert torch.isfinite(penalty)
    assert_close(penalty, want_penalty, torch.float64, "penalty")


def test_triton_segments_are_sorted_runs():
    ids = torch.tensor([[4, 1, 4], [9, 1, 4]], dtype=torch.int32)
    ordered, perm, seg_end = triton_mba.sort_segments(ids)
    assert ordered.tolist() == [1, 1, 4, 4, 4, 9]
    assert torch.equal(ids.reshape(-1)[perm].long(), ordered)
    assert seg_end.tolist() == [2, 2, 5, 5, 5, 6]
    assert [t.numel() for t in triton_mba.sort_segments(torch.empty(0, dtype=torch.long))] == [0, 0, 0]


# ---------------------------------------------------------------------------------------------- MBAEmbedding


def _explicit(weight, lookups, counts, lam, padding_idx, grads_out):
    """``nn.Embedding``'s gradient of the lookups plus the MBA term of their distinct ids (float64)."""
    w = weight.detach().clone().requires_grad_()
    loss = sum((F.embedding(i, w, padding_idx) * g).sum() for i, g in zip(lookups, grads_out))
    loss.backward()
    all_ids = torch.cat([i.reshape(-1) for i in lookups])
    return mba_l2_ref(w.detach(), w.grad, all_ids, counts, lam, padding_idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_matches_explicit_term(backend, sparse, padding_idx, poison):
    """Two lookups of the table in one step (the ad's ids and the behaviours' ids): the term is applied once."""
    weight, _, ids, counts = make_case(6)
    ad_ids = torch.tensor([5, 22, 8])
    table = dk.MBAEmbedding(K, D, counts=counts, lam=0.4, padding_idx=padding_idx, sparse=sparse, backend=backend,
                            _weight=weight.clone())
    ad, hist = table(ad_ids, ids)
    assert ad.shape == (3, D) and hist.shape == (3, 5, D)
    g = torch.Generator().manual_seed(7)
    grads_out = [torch.randn(ad.shape, generator=g, dtype=torch.float64),
                 torch.randn(hist.shape, generator=g, dtype=torch.float64)]
    ((ad * grads_out[0]).sum() + (hist * grads_out[1]).sum()).backward()
    want, want_penalty = _explicit(weight, [ad_ids, ids], counts, 0.4, padding_idx, grads_out)
    got = table.weight.grad
    assert got.is_sparse == sparse
    assert_close(got.to_dense(), want, torch.float64, "weight grad")
    assert_close(table.last_penalty, want_penalty, torch.float64, "last_penalty")
    assert_close(ad, F.embedding(ad_ids, weight, padding_idx), torch.float64, "lookup")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_reads_no_row_outside_the_batch(backend, sparse, poison):
    weight, _, ids, counts = make_case(17)
    outside = torch.ones(K, dtype=torch.bool)
    outside[ids.unique()] = False
    weight[outside] = float("nan")
    table = dk.MBAEmbedding(K, D, counts=counts, lam=0.3, padding_idx=0, sparse=sparse, backend=backend,
                            _weight=weight.clone())
    table(ids).sum().backward()
    grad = table.weight.grad.to_dense()
    assert torch.isfinite(grad).all() and torch.isfinite(table.last_penalty)
    assert not grad[outside].any()
    want, want_penalty = _explicit(weight.nan_to_num(), [ids], counts, 0.3, 0, [torch.ones(*ids.shape, D)])
    assert_close(grad, want, torch.float64, "weight grad")
    assert_close(table.last_penalty, want_penalty, torch.float64, "last_penalty")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_dtypes_and_lam_zero(backend, dtype):
    weight, _, ids, counts = make_case(8)
    for lam in (0.0, 0.25):
        table = dk.MBAEmbedding(K, D, counts=counts, lam=lam, backend=backend, _weight=weight.to(dtype))
        go = torch.randn(*ids.shape, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        (table(ids) * go.to(dtype)).sum().backward()
        want, _ = _explicit(weight.to(dtype).double(), [ids], counts, lam, None, [go.to(dtype).double()])
        assert table.weight.grad.dtype == dtype
        assert_close(table.weight.grad, want, dtype, f"weight grad (lam={lam})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_without_grad(backend):
    weight, _, ids, counts = make_case(18)
    table = dk.MBAEmbedding(K, D, counts=counts, lam=0.3, padding_idx=0, backend=backend, _weight=weight.clone())
    with torch.no_grad():
        out = table(ids)
    assert not out.requires_grad
    assert torch.equal(out, F.embedding(ids, weight, 0))
    assert_close(table.last_penalty, mba_l2_ref(weight, weight, ids, counts, 0.3, 0)[1], torch.float64, "penalty")


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_popular_id(backend):
    """One id looked up 150 times (several blocks of the triton segment loop) next to ids seen once."""
    weight, _, _, counts = make_case(19)
    ids = torch.cat([torch.full((150,), 5), torch.tensor([1, 2, 22])])[torch.randperm(153)]
    go = torch.randn(153, D, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    table = dk.MBAEmbedding(K, D, counts=counts, lam=0.2, backend=backend, _weight=weight.clone())
    (table(ids) * go).sum().backward()
    want, _ = _explicit(weight, [ids], counts, 0.2, None, [go])
    assert_close(table.weight.grad, want, torch.float64, "weight grad")


def test_triton_embedding_backward_is_deterministic():
    weight, _, _, counts = make_case(10, torch.float32)
    ids = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(11))  # long segments
    go = torch.randn(60, D, generator=torch.Generator().manual_seed(12))
    grads = []
    for _ in range(2):
        table = dk.MBAEmbedding(K, D, counts=counts, lam=0.1, backend="triton", _weight=weight.clone())
        (table(ids) * go).sum().backward()
        grads.append(table.weight.grad)
    assert torch.equal(grads[0], grads[1])


def test_embedding_calls_apply_the_term_per_call():
    """Documented: calling the module twice in one step applies the term twice (one call takes every lookup)."""
    weight, _, ids, counts = make_case(13)
    table = dk.MBAEmbedding(K, D, counts=counts, lam=0.5, backend="triton", _weight=weight.clone())
    (table(ids).sum() + table(ids).sum()).backward()
    want, _ = _explicit(weight, [ids, ids], counts, 0.5, None, [torch.ones(*ids.shape, D)] * 2)
    term = mba_l2_ref(weight, torch.zeros_like(weight), ids, counts, 0.5)[0]
    assert_close(table.weight.grad, want + term, torch.float64, "two calls")


# ------------------------------------------------------------------------------------------------ mba_counts


def test_mba_counts():
    ids = torch.tensor([[3, 3, 0, 5], [5, 1, 1, 1], [0, 0, 0, 0]])
    assert dk.mba_counts(ids, 7).tolist() == [2, 1, 0, 1, 0, 2, 0]
    assert dk.mba_counts(ids, 7, padding_idx=0).tolist() == [0, 1, 0, 1, 0, 2, 0]
    assert dk.mba_counts(torch.tensor([2, 2, 4]), 5).tolist() == [0, 0, 2, 0, 1]
    assert dk.mba_counts(torch.empty(0, 3, dtype=torch.long), 4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\].*\[0, 7\]"):
        dk.mba_counts(torch.tensor([[7, 0]]), 7)


# ---------------------------------------------------------------------------------------------- registration

# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_bad_input(backend):
    weight, grad, ids, counts = make_case(15)
    with pytest.raises(ValueError, match=r"weight must be 2-D.*\(23,\)"):
        dk.mba_l2_(weight[:, 0], grad[:, 0], ids, counts, 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"grad.*\(23, 7\).*\(23, 6\)"):
        dk.mba_l2_(weight, grad[:, :6], ids, counts, 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"counts.*\[23\].*\(22,\)"):
        dk.mba_l2_(weight, grad, ids, counts[:22], 0.1, backend=backend)
    with pytest.raises(TypeError, match=r"ids.*torch.float32"):
        dk.mba_l2_(weight, grad, ids.float(), counts, 0.1, backend=backend)
    with pytest.raises(TypeError, match=r"weight.*torch.int64"):
        dk.mba_l2_(counts.reshape(-1, 1), counts.reshape(-1, 1), ids, counts, 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 22\].*\[-1, 11\]"):
        dk.mba_l2_(weight, grad, torch.tensor([-1, 11]), counts, 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"sparse grad must have sparse_dim 1.*sparse_dim 2"):
        dk.mba_l2_(weight, grad.to_sparse(), ids, counts, 0.1, backend=backend)


def test_bad_embedding_arguments():
    with pytest.raises(ValueError, match=r"padding_idx.*\[0, 9\].*10"):
        dk.MBAEmbedding(10, 4, padding_idx=10)
    with pytest.raises(ValueError, match=r"counts.*\[10\].*\(9,\)"):
        dk.MBAEmbedding(10, 4, counts=torch.ones(9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"backend must be one of.*'fast'"):
        dk.MBAEmbedding(10, 4, backend="fast")
    table = dk.MBAEmbedding(10, 4, backend="triton")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 9\].*\[0, 10\]"):
        table(torch.tensor([0, 10]))
    with pytest.raises(TypeError, match=r"ids\[1\].*torch.float32"):
        table(torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(dk.BackendUnavailableError, match="'cuda'"):
        dk.MBAEmbedding(10, 4, backend="cuda")(torch.tensor([1]))


def test_triton_kernel_clamps_ids_with_checks_off():
    """With the value checks off, an out-of-range id is skipped by the kernel (no out-of-bounds access)."""
    weight, grad, _, counts = make_case(16)
    ids = torch.tensor([2, 40, -3, 2])
    got = grad.clone()
    with dk.checks(False):
        _, penalty = dk.mba_l2_(weight, got, ids, counts, 0.2, backend="triton")
    want, want_penalty = mba_l2_ref(weight, grad, torch.tensor([2]), counts, 0.2)
    assert_close(got, want, torch.float64, "grad")
    assert_close(penalty, want_penalty, torch.float64, "penalty")


# --------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_realistic_embedding(sparse):
    """An item table of 2M rows x 64, a batch of 4096 samples x 100 behaviours plus the ads: triton against torch
    and the float64 reference."""
    dev = "cuda"
    K_big, D_big = 2_000_000, 64
    g = torch.Generator(device=dev).manual_seed(0)
    weight = torch.randn(K_big, D_big, device=dev, generator=g)
    counts = torch.randint(0, 50, (K_big,), device=dev, generator=g)
    hist = torch.randint(0, 50_000, (4096, 100), device=dev, generator=g)  # many repeats
    ads = torch.randint(0, K_big, (4096,), device=dev, generator=g)
    go_ad = torch.randn(4096, D_big, device=dev, generator=g)
    go_hist = torch.randn(4096, 100, D_big, device=dev, generator=g)
    grads = {}
    for backend in BACKENDS:
        table = dk.MBAEmbedding(K_big, D_big, counts=counts, lam=0.01, padding_idx=0, sparse=sparse, backend=backend,
                                _weight=weight.clone())
        ad, h = table(ads, hist)
        ((ad * go_ad).sum() + (h * go_hist).sum()).backward()
        grads[backend] = table.weight.grad.to_dense() if sparse else table.weight.grad
    touched = torch.cat([ads, hist.reshape(-1)]).unique()
    want, _ = _explicit(weight[touched].double(), [torch.searchsorted(touched, ads),
                                                   torch.searchsorted(touched, hist)],
                        counts[touched], 0.01, None, [go_ad.double(), go_hist.double()])
    if touched[0] == 0:  # the padding row: no gradient, no term
        want[0] = 0
    assert_close(grads["triton"][touched], want, torch.float32, "triton grad")
    assert_close(grads["torch"][touched], want, torch.float32, "torch grad")


@pytest.mark.gpu
def test_gpu_dense_mba_has_no_host_sync():
    dev = "cuda"
    weight, grad = torch.randn(1_000_000, 32, device=dev), torch.zeros(1_000_000, 32, device=dev)
    ids, counts = torch.randint(0, 1_000_000, (8192, 50), device=dev), torch.ones(1_000_000, device=dev)
    with dk.checks(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            dk.mba_l2_(weight, grad, ids, counts, 0.1, backend="triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    want, _ = mba_l2_ref(weight, torch.zeros_like(grad), ids, counts, 0.1)
    assert torch.equal(grad != 0, want != 0)
    assert_close(grad, want, torch.float32, "grad")
