// Mini-batch aware L2 (SPEC section 3) on CUDA GPUs: the CUDA kernels of din_kernels::mba_l2_dense, mba_penalty,
// mba_embedding, mba_embedding_bwd_dense and mba_embedding_bwd_sparse (schemas in din_kernels/ops/schema.py).
//
// The ids of a step are sorted once on the device (a stable at::sort, no host sync); equal ids then form segments.
// One warp per sorted position i: the warp at the start of a segment owns the distinct id j (when j is inside the
// table and not padding_idx) and every other warp does nothing (or writes its zero row of a sparse gradient). The
// owner, 256 columns at a time (8 a lane):
//   - sums the output-gradient rows of its segment in sorted order (the embedding backward: each touched row written
//     exactly once, deterministic, no atomics),
//   - adds lam * W[j] / n[j] (n clamped to at least 1; W is not read when lam = 0),
//   - writes the row: added in place into a dense grad (mba_l2_dense), stored into a fresh dense grad, or stored at
//     the segment's first position of a [M, D] sparse-values buffer (an uncoalesced COO gradient with one entry per
//     lookup, zero where a lookup is not its row's owner: no shape depends on the ids' values),
//   - and its penalty share lam / 2 * ||W[j]||^2 / n[j] (summed by at::sum).
// Only the rows of the batch's ids are read or written: the cost is O(batch), not O(K). Ids outside [0, K) (possible
// only with the checks off) are never read or written.
#include <torch/library.h>

#include "common.cuh"

namespace din::cuda {
namespace {

using at::Tensor;

enum Out : int { kNone = 0, kAddAtId = 1, kStoreAtId = 2, kStoreAtPosition = 3 };
constexpr int kCols = 8;  // columns a lane holds (256 a warp per step)

// counts[j] as the compute type, clamped to at least 1 (counts of any integer or floating dtype)
template <typename A>
__device__ __forceinline__ A count_of(const void* counts, int kind, int64_t j) {
  A n;
  switch (kind) {
    case 0: n = static_cast<A>(static_cast<const int64_t*>(counts)[j]); break;
    case 1: n = static_cast<A>(static_cast<const int32_t*>(counts)[j]); break;
    case 2: n = static_cast<A>(static_cast<const float*>(counts)[j]); break;
    default: n = static_cast<A>(static_cast<const double*>(counts)[j]); break;
  }
  return n > A(1) ? n : A(1);
}

struct Segments {
  const int64_t *sorted, *perm;  // [M]: ids.flatten() sorted (stable) and the permutation
  int64_t M, K, D, padding_idx;  // padding_idx -1: none
};

template <typename T>
__global__ void __launch_bounds__(256) mba_segments_kernel(Segments sg, const T* __restrict__ weight, int64_t w_s0,
                                                           int64_t w_s1, const void* __restrict__ counts,
                                                           int counts_kind, const T* __restrict__ grad_out,
                                                           T* __restrict__ out, int64_t o_s0, int64_t o_s1,
                                                           acc_t<T>* __restrict__ shares, double lam_d, int mode) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (256 / 32) + (threadIdx.x >> 5);
  if (i >= sg.M) return;
  const int64_t j = sg.sorted[i];
  const bool live = (i == 0 || j != sg.sorted[i - 1]) && j != sg.padding_idx && j >= 0 && j < sg.K;
  const A lam = static_cast<A>(lam_d);
  if (!live) {
    if (mode == kStoreAtPosition)
      for (int64_t d = lane; d < sg.D; d += 32) out[i * o_s0 + d * o_s1] = from_acc<T>(A(0));
    if (shares != nullptr && lane == 0) shares[i] = A(0);
    return;
  }
  const A n = lam != A(0) ? count_of<A>(counts, counts_kind, j) : A(1);
  int64_t end = i + 1;  // one past the segment
  while (end < sg.M && sg.sorted[end] == j) ++end;
  A sq = 0;
  for (int64_t d0 = 0; d0 < sg.D; d0 += 32 * kCols) {
    A acc[kCols];
#pragma unroll
    for (int u = 0; u < kCols; ++u) acc[u] = 0;
    if (grad_out != nullptr)
      for (int64_t k = i; k < end; ++k) {  // the segment's output-gradient rows, in sorted order
        const T* row = grad_out + sg.perm[k] * sg.D;
#pragma unroll
        for (int u = 0; u < kCols; ++u) {
          const int64_t d = d0 + lane + 32 * u;
          if (d < sg.D) acc[u] += to_acc(row[d]);
        }
      }
#pragma unroll
    for (int u = 0; u < kCols; ++u) {
      const int64_t d = d0 + lane + 32 * u;
      if (d >= sg.D) continue;
      if (lam != A(0)) {
        const A w = to_acc(weight[j * w_s0 + d * w_s1]);
        sq += w * w;
        acc[u] += lam * w / n;
      }
      if (mode == kAddAtId) {
        T* dst = out + j * o_s0 + d * o_s1;
        *dst = from_acc<T>(to_acc(*dst) + acc[u]);
      } else if (mode == kStoreAtId) {
        out[j * o_s0 + d * o_s1] = from_acc<T>(acc[u]);
      } else if (mode == kStoreAtPosition) {
        out[i * o_s0 + d * o_s1] = from_acc<T>(acc[u]);
      }
    }
  }
  if (shares != nullptr) {
    // the lanes' squares summed in a fixed order (the shuffle tree)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if (lane == 0) shares[i] = lam / A(2) * sq / n;
  }
}

int counts_kind(const Tensor& counts) {
  switch (counts.scalar_type()) {
    case at::kLong: return 0;
    case at::kInt: return 1;
    case at::kFloat: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "mba: counts must be int64, int32, float32 or float64, got ", counts.scalar_type());
  }
}

// The checked inputs of one call and the sorted ids
struct Batch {
  Tensor sorted, perm, counts;
  Segments sg{};
  int kind = 0;

  Batch(const Tensor& weight, const Tensor& ids, const Tensor& counts_in, std::optional<int64_t> padding_idx,
        const char* op) {
    check_cuda(weight, weight, op, "weight");
    check_cuda(ids, weight, op, "ids");
    check_cuda(counts_in, weight, op, "counts");
    TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [K, D], got shape ", weight.sizes());
    TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
                ": ids must be int32 or int64, got ", ids.scalar_type());
    TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == weight.size(0), op, ": counts must have shape [K] = [",
                weight.size(0), "], got ", counts_in.sizes());
    kind = counts_kind(counts_in);
    counts = counts_in.contiguous();
    Tensor flat = ids.reshape({-1}).to(at::kLong);
    std::tie(sorted, perm) = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sg.sorted = sorted.data_ptr<int64_t>();
    sg.perm = perm.data_ptr<int64_t>();
    sg.M = sorted.numel();
    sg.K = weight.size(0);
    sg.D = weight.size(1);
    sg.padding_idx = padding_idx.has_value() ? *padding_idx : -1;
  }
};

// Runs the segments kernel; returns the penalty (0-dim, weight's dtype) when `penalty`
Tensor run_segments(const Batch& bt, const Tensor& weight, const Tensor* grad_out, const Tensor* out, int mode,
                    double lam, bool penalty) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = bt.sg.M;
  return dispatch<true>(weight.scalar_type(), "mba: weight", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    Tensor shares = at::empty({penalty ? M : 0}, weight.options().dtype(c10::CppTypeToScalarType<A>::value));
    if (M > 0 && bt.sg.D > 0) {
      const auto blocks = static_cast<unsigned>((M + 7) / 8);
      mba_segments_kernel<T><<<blocks, 256, 0, stream>>>(
          bt.sg, reinterpret_cast<const T*>(weight.data_ptr()), weight.stride(0), weight.stride(1),
          bt.counts.data_ptr(), bt.kind, grad_out ? reinterpret_cast<const T*>(grad_out->data_ptr()) : nullptr,
          out ? reinterpret_cast<T*>(out->data_ptr()) : nullptr, out ? out->stride(0) : 0, out ? out->stride(1) : 0,
          penalty ? shares.data_ptr<A>() : nullptr, lam, mode);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (penalty) {
      shares.zero_();
    }
    return penalty ? shares.sum().to(weight.scalar_type()) : Tensor();
  });
}

Tensor flat_grad_out(const Tensor& grad_out, const Tensor& weight, const Batch& bt, const char* op) {
  check_cuda(grad_out, weight, op, "grad_out");
  TORCH_CHECK(grad_out.numel() == bt.sg.M * bt.sg.D, op, ": grad_out must hold one row of D = ", bt.sg.D,
              " per lookup (", bt.sg.M, " lookups), got shape ", grad_out.sizes());
  return grad_out.reshape({bt.sg.M, bt.sg.D}).to(weight.scalar_type()).contiguous();
}

Tensor mba_l2_dense_cuda(const Tensor& weight, const Tensor& grad, const Tensor& ids, const Tensor& counts, double lam,
                         std::optional<int64_t> padding_idx) {
  c10::cuda::CUDAGuard guard(weight.device());
  Batch bt(weight, ids, counts, padding_idx, "mba_l2_dense");
  check_cuda(grad, weight, "mba_l2_dense", "grad");
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.scalar_type() == weight.scalar_type(),
              "mba_l2_dense: grad must have the shape and dtype of weight (", weight.sizes(), ", ",
              weight.scalar_type(), "), got ", grad.sizes(), " and ", grad.scalar_type());
  return run_segments(bt, weight, nullptr, &grad, kAddAtId, lam, true);
}

Tensor mba_penalty_cuda(const Tensor& weight, const Tensor& ids, const Tensor& counts, double lam,
                        std::optional<int64_t> padding_idx) {
  c10::cuda::CUDAGuard guard(weight.device());
  Batch bt(weight, ids, counts, padding_idx, "mba_penalty");
  return run_segments(bt, weight, nullptr, nullptr, kNone, lam, true);
}

Tensor mba_embedding_cuda(const Tensor& weight, const Tensor& ids, const Tensor& counts, double lam,
                          std::optional<int64_t> padding_idx, bool sparse) {
  (void)counts, (void)lam, (void)padding_idx, (void)sparse;  // the backward's
  c10::cuda::CUDAGuard guard(weight.device());
  check_cuda(weight, weight, "mba_embedding", "weight");
  check_cuda(ids, weight, "mba_embedding", "ids");
  TORCH_CHECK(weight.dim() == 2, "mba_embedding: weight must be 2-D [K, D], got shape ", weight.sizes());
  const int64_t K = weight.size(0);
  // ids clamped into the table (memory-safe with the checks off), as every backend's lookup
  return at::embedding(weight, ids.clamp(0, std::max<int64_t>(K - 1, 0)));
}

Tensor mba_embedding_bwd_dense_cuda(const Tensor& grad_out, const Tensor& ids, const Tensor& weight,
                                    const Tensor& counts, double lam, std::optional<int64_t> padding_idx) {
  c10::cuda::CUDAGuard guard(weight.device());
  Batch bt(weight, ids, counts, padding_idx, "mba_embedding_bwd_dense");
  Tensor g = flat_grad_out(grad_out, weight, bt, "mba_embedding_bwd_dense");
  Tensor grad = at::zeros(weight.sizes(), weight.options());
  run_segments(bt, weight, &g, &grad, kStoreAtId, lam, false);
  return grad;
}

std::tuple<Tensor, Tensor> mba_embedding_bwd_sparse_cuda(const Tensor& grad_out, const Tensor& ids,
                                                         const Tensor& weight, const Tensor& counts, double lam,
                                                         std::optional<int64_t> padding_idx) {
  c10::cuda::CUDAGuard guard(weight.device());
  Batch bt(weight, ids, counts, padding_idx, "mba_embedding_bwd_sparse");
  Tensor g = flat_grad_out(grad_out, weight, bt, "mba_embedding_bwd_sparse");
  Tensor values = at::empty({bt.sg.M, bt.sg.D}, weight.options());
  run_segments(bt, weight, &g, &values, kStoreAtPosition, lam, false);
  return {bt.sorted.clamp(0, std::max<int64_t>(bt.sg.K - 1, 0)), values};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_kernels, CUDA, m) {
  m.impl("mba_l2_dense", &mba_l2_dense_cuda);
  m.impl("mba_penalty", &mba_penalty_cuda);
  m.impl("mba_embedding", &mba_embedding_cuda);
  m.impl("mba_embedding_bwd_dense", &mba_embedding_bwd_dense_cuda);
  m.impl("mba_embedding_bwd_sparse", &mba_embedding_bwd_sparse_cuda);
}

}  // namespace din::cuda
