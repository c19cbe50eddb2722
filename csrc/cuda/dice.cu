// Dice (SPEC section 2) on CUDA GPUs: the CUDA kernels of din_kernels::dice_fwd, dice_bwd and dice_update_running
// (schemas in din_kernels/ops/schema.py; csrc/cpu/dice.cpp holds the CPU kernels of the same ops). x is viewed as
// [N, C] (positions x channels), the mask as [N]; computation is in float32 (float64 when x or alpha is float64).
//
// Reductions over the positions (the batch statistics in training, the backward's per-channel sums) run on a grid of
// (ceil(C / 32), R) blocks of 32 x 8 threads: threadIdx.x is a channel of the block's 32 consecutive channels (a
// warp reads 32 consecutive elements of a row), threadIdx.y one of 8 lanes over the rows of the block's row range.
// Each thread accumulates its rows (the statistics by Welford's update, csrc/common/math.h's merge_moments with one
// position), the 8 lanes are merged in order in shared memory, each block writes one partial [R, k, C], and a second
// kernel merges the R partials in order: bit-reproducible, no atomics. The elementwise passes (y; dx) read and write
// 16 bytes a thread when the rows allow it. The formulas are math.h's (dice_gate's sigmoid, dice_forward,
// dice_backward_affine, dice_stats_term), the CPU kernels' own; see din_kernels/torch_impl/dice.py for their
// derivation.
#include <torch/library.h>

#include "common.cuh"

namespace din::cuda {
namespace {

using at::Tensor;

constexpr int kLanes = 8;  // row lanes of a reduction block (blockDim = 32 x 8)
constexpr int kSums = 5;   // the backward's per-channel sums: g, g u, dy x (1 - p), gp u, gp

// Per-channel parameters in the compute type A, each [C] (weight, bias null without affine)
template <typename A>
struct Channels {
  const A *alpha, *weight, *bias, *mean, *r;
};

// p = sigmoid(weight * u + bias) and u = (x - mean) * r at channel c
template <typename A>
__device__ __forceinline__ A gate(const Channels<A>& ch, int64_t c, A x, A* u) {
  *u = dice_u(x, ch.mean[c], ch.r[c]);
  A a = ch.weight ? *u * ch.weight[c] : *u;
  if (ch.bias) a += ch.bias[c];
  return sigmoid(a);
}

// rows [y * chunk, min(N, (y + 1) * chunk)) of reduction block y
__device__ __forceinline__ void block_rows(int64_t N, int64_t chunk, int64_t* r0, int64_t* r1) {
  *r0 = static_cast<int64_t>(blockIdx.y) * chunk;
  *r1 = *r0 + chunk < N ? *r0 + chunk : N;
}

// Training forward, pass 1: per block (count, mean, M2) of each channel over the selected rows -> part [R, 3, C]
template <typename T>
__global__ void __launch_bounds__(256) dice_moments_kernel(const T* __restrict__ x, const bool* __restrict__ mask,
                                                           int64_t N, int64_t C, int64_t chunk,
                                                           acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A sh[3][kLanes][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  int64_t r0, r1;
  block_rows(N, chunk, &r0, &r1);
  A n = 0, mean = 0, m2 = 0;
  if (c < C)
    for (int64_t r = r0 + ty; r < r1; r += kLanes) {
      if (mask != nullptr && !mask[r]) continue;  // unselected rows are not read (NaN there stays out)
      merge_moments<A>(&n, &mean, &m2, A(1), to_acc(x[r * C + c]), A(0));
    }
  sh[0][ty][tx] = n;
  sh[1][ty][tx] = mean;
  sh[2][ty][tx] = m2;
  __syncthreads();
  if (ty != 0 || c >= C) return;
  for (int l = 1; l < kLanes; ++l) merge_moments<A>(&n, &mean, &m2, sh[0][l][tx], sh[1][l][tx], sh[2][l][tx]);
  A* out = part + static_cast<int64_t>(blockIdx.y) * 3 * C;
  out[c] = n;
  out[C + c] = mean;
  out[2 * C + c] = m2;
}

// pass 2: the R partials merged in order -> stats [3, C] (mean, biased variance, count)
template <typename A>
__global__ void __launch_bounds__(256) dice_moments_merge_kernel(const A* __restrict__ part, int64_t R, int64_t C,
                                                                 A* __restrict__ stats) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (c >= C) return;
  A n = 0, mean = 0, m2 = 0;
  for (int64_t y = 0; y < R; ++y) {
    const A* p = part + y * 3 * C;
    merge_moments<A>(&n, &mean, &m2, p[c], p[C + c], p[2 * C + c]);
  }
  stats[c] = mean;
  stats[C + c] = n > 0 ? m2 / n : A(0);
  stats[2 * C + c] = n;
}

// Elementwise over [N, C]: f(e, c) for every element e (channel c = e % C), V elements a thread when vec (16-byte
// rows), one otherwise.
template <typename T, typename F>
__device__ __forceinline__ void for_elements(int64_t total, int64_t C, bool vec, const F& f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    for (; i < total / V; i += stride) f(i * V, (i * V) % C, std::integral_constant<int, V>{});
    return;
  }
  for (; i < total; i += stride) f(i, i % C, std::integral_constant<int, 1>{});
}

template <typename T>
__global__ void __launch_bounds__(256) dice_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t total,
                                                           int64_t C, Channels<acc_t<T>> ch, bool vec) {
  using A = acc_t<T>;
  for_elements<T>(total, C, vec, [&](int64_t e, int64_t c0, auto width) {
    constexpr int V = decltype(width)::value;
    alignas(16) T xv[V], yv[V];
    if constexpr (V > 1) {
      *reinterpret_cast<uint4*>(xv) = __ldg(reinterpret_cast<const uint4*>(x + e));
    } else {
      xv[0] = x[e];
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = c0 + j;
      const A xa = to_acc(xv[j]);
      A u;
      yv[j] = from_acc<T>(dice_forward(xa, ch.alpha[c], gate(ch, c, xa, &u)));
    }
    if constexpr (V > 1) {
      *reinterpret_cast<uint4*>(y + e) = *reinterpret_cast<const uint4*>(yv);
    } else {
      y[e] = yv[0];
    }
  });
}

// Backward, pass 1: per block sums of g, g u, dy x (1 - p), gp u and gp of each channel over every row ->
// part [R, 5, C]
template <typename T>
__global__ void __launch_bounds__(256) dice_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x, int64_t N,
                                                        int64_t C, int64_t chunk, Channels<acc_t<T>> ch,
                                                        acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A sh[kSums][kLanes][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  int64_t r0, r1;
  block_rows(N, chunk, &r0, &r1);
  A acc[kSums] = {0, 0, 0, 0, 0};
  if (c < C) {
    const A w = ch.weight ? ch.weight[c] : A(1);
    for (int64_t r = r0 + ty; r < r1; r += kLanes) {
      const A xa = to_acc(x[r * C + c]), d = to_acc(dy[r * C + c]);
      A u, gp, g, da;
      const A p = gate(ch, c, xa, &u);
      dice_backward_affine(d, xa, ch.alpha[c], p, ch.r[c], w, &gp, &g, &da);
      acc[0] += g;
      acc[1] += g * u;
      acc[2] += da;
      acc[3] += gp * u;
      acc[4] += gp;
    }
  }
#pragma unroll
  for (int k = 0; k < kSums; ++k) sh[k][ty][tx] = acc[k];
  __syncthreads();
  if (ty != 0 || c >= C) return;
  A* out = part + static_cast<int64_t>(blockIdx.y) * kSums * C;
#pragma unroll
  for (int k = 0; k < kSums; ++k) {
    A s = 0;
    for (int l = 0; l < kLanes; ++l) s += sh[k][l][tx];
    out[k * C + c] = s;
  }
}

// Backward, pass 2: dx = dy (alpha + (1 - alpha) p) + r g, less r / Nv (sum g + u sum g u) at the selected rows in
// training (sums: the totals [5, C] of pass 1; count: the number of selected rows)
template <typename T>
__global__ void __launch_bounds__(256) dice_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                      const bool* __restrict__ mask, T* __restrict__ dx, int64_t total,
                                                      int64_t C, Channels<acc_t<T>> ch,
                                                      const acc_t<T>* __restrict__ sums,
                                                      const acc_t<T>* __restrict__ count, bool training, bool vec) {
  using A = acc_t<T>;
  const A inv_n = training && *count > 0 ? A(1) / *count : A(0);
  for_elements<T>(total, C, vec, [&](int64_t e, int64_t c0, auto width) {
    constexpr int V = decltype(width)::value;
    alignas(16) T xv[V], dv[V], out[V];
    if constexpr (V > 1) {
      *reinterpret_cast<uint4*>(xv) = __ldg(reinterpret_cast<const uint4*>(x + e));
      *reinterpret_cast<uint4*>(dv) = __ldg(reinterpret_cast<const uint4*>(dy + e));
    } else {
      xv[0] = x[e];
      dv[0] = dy[e];
    }
    const bool selected = training && (mask == nullptr || mask[e / C]);  // a row's V elements share it (V divides C)
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = c0 + j;
      const A xa = to_acc(xv[j]);
      A u, gp, g, da;
      const A p = gate(ch, c, xa, &u);
      A v = dice_backward_affine(to_acc(dv[j]), xa, ch.alpha[c], p, ch.r[c], ch.weight ? ch.weight[c] : A(1), &gp,
                                 &g, &da);
      if (selected) v -= dice_stats_term(u, ch.r[c], sums[c], sums[C + c], inv_n);
      out[j] = from_acc<T>(v);
    }
    if constexpr (V > 1) {
      *reinterpret_cast<uint4*>(dx + e) = *reinterpret_cast<const uint4*>(out);
    } else {
      dx[e] = out[0];
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(256) dice_update_running_kernel(T* __restrict__ rm, T* __restrict__ rv,
                                                                  const double* __restrict__ stats, int64_t C,
                                                                  double momentum) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (c >= C) return;
  double m = static_cast<double>(to_acc(rm[c])), v = static_cast<double>(to_acc(rv[c]));
  if (running_update(&m, &v, stats[c], stats[C + c], stats[2 * C + c], momentum)) {
    rm[c] = from_acc<T>(static_cast<acc_t<T>>(m));
    rv[c] = from_acc<T>(static_cast<acc_t<T>>(v));
  }
}

// ------------------------------------------------------------------------------------------------------- host

void check_dice(const Tensor& x, const std::optional<Tensor>& mask, const Tensor& alpha, int64_t C, const char* op) {
  check_cuda(x, x, op, "x");
  check_cuda(alpha, x, op, "alpha");
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor [..., C], got ",
              x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(alpha.dim() == 1 && (alpha.numel() == 1 || alpha.numel() == C), op, ": alpha must have shape [", C,
              "] or [1], got ", alpha.sizes());
  if (mask.has_value() && mask->defined()) {
    check_cuda(*mask, x, op, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == x.sizes().slice(0, x.dim() - 1), op, ": mask must have shape ",
                x.sizes().slice(0, x.dim() - 1), ", got ", mask->sizes());
  }
}

void check_channel(const std::optional<Tensor>& t, const Tensor& x, int64_t C, const char* name, const char* op) {
  if (!t.has_value() || !t->defined()) return;
  check_cuda(*t, x, op, name);
  TORCH_CHECK(t->dim() == 1 && t->numel() == C, op, ": ", name, " must have shape [", C, "], got ", t->sizes());
}

bool defined(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// the reduction grid: (ceil(C / 32), R) blocks, R row ranges of `chunk` rows
struct Reduction {
  dim3 grid;
  int64_t chunk, R;
  Reduction(int64_t N, int64_t C, int sms) {
    const int64_t gx = std::max<int64_t>(1, (C + 31) / 32);
    const int64_t want = std::max<int64_t>(1, 4 * sms / gx);  // about 4 blocks an SM
    chunk = std::max<int64_t>(64, (N + want - 1) / want);
    R = std::max<int64_t>(1, (N + chunk - 1) / chunk);
    grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(R));
  }
};

int elementwise_blocks(int64_t work, int sms) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + 255) / 256, 32LL * sms)));
}

// The channel parameters in the compute dtype (mean and r = 1 / sqrt(var + eps) from stats [3, C]); `keep` holds them.
template <typename A>
Channels<A> channels(const Tensor& alpha, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                     const Tensor& stats, double eps, int64_t C, std::vector<Tensor>& keep) {
  const auto dt = stats.scalar_type();
  auto vec = [&](const Tensor& t) {
    keep.push_back(t.to(dt).expand({C}).contiguous());
    return keep.back().data_ptr<A>();
  };
  Channels<A> ch;
  ch.alpha = vec(alpha);
  ch.weight = defined(weight) ? vec(*weight) : nullptr;
  ch.bias = defined(bias) ? vec(*bias) : nullptr;
  ch.mean = vec(stats[0]);
  ch.r = vec((stats[1] + eps).rsqrt());
  return ch;
}

// x's element type for the kernels: float64 when x or alpha is float64 (as the CPU kernels), else x's own
at::ScalarType kernel_dtype(const Tensor& x, const Tensor& alpha) {
  return x.scalar_type() == at::kDouble || alpha.scalar_type() == at::kDouble ? at::kDouble : x.scalar_type();
}

std::tuple<Tensor, Tensor> dice_fwd_cuda(const Tensor& x, const std::optional<Tensor>& mask, const Tensor& alpha,
                                         const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                         const std::optional<Tensor>& running_mean,
                                         const std::optional<Tensor>& running_var, bool training, double eps) {
  const int64_t C = x.dim() ? x.size(-1) : 0;
  check_dice(x, mask, alpha, C, "dice_fwd");
  check_channel(weight, x, C, "weight", "dice_fwd");
  check_channel(bias, x, C, "bias", "dice_fwd");
  check_channel(running_mean, x, C, "running_mean", "dice_fwd");
  check_channel(running_var, x, C, "running_var", "dice_fwd");
  TORCH_CHECK(training || (defined(running_mean) && defined(running_var)),
              "dice_fwd: eval mode (training=False) needs running_mean and running_var");
  c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType kt = kernel_dtype(x, alpha);
  return dispatch<true>(kt, "dice: x", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto opt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int sms = num_sms(x);
    Tensor xc = x.to(kt).contiguous();
    const int64_t N = C ? xc.numel() / C : 0;
    const T* xp = reinterpret_cast<const T*>(xc.data_ptr());
    Tensor stats;
    if (training) {
      stats = at::zeros({3, C}, opt);
      if (N > 0 && C > 0) {
        Tensor m = defined(mask) ? mask->contiguous() : Tensor();
        Reduction red(N, C, sms);
        Tensor part = at::empty({red.R, 3, C}, opt);
        dice_moments_kernel<T><<<red.grid, dim3(32, kLanes), 0, stream>>>(
            xp, m.defined() ? m.data_ptr<bool>() : nullptr, N, C, red.chunk, part.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        dice_moments_merge_kernel<A><<<static_cast<unsigned>((C + 255) / 256), 256, 0, stream>>>(
            part.data_ptr<A>(), red.R, C, stats.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      stats = at::stack({running_mean->to(opt.dtype()).reshape({C}), running_var->to(opt.dtype()).reshape({C}),
                         at::zeros({C}, opt)});
    }
    Tensor y = at::empty(xc.sizes(), xc.options());
    const int64_t total = xc.numel();
    if (total > 0) {
      std::vector<Tensor> keep;
      Channels<A> ch = channels<A>(alpha, weight, bias, stats, eps, C, keep);
      const bool vec = (C * static_cast<int64_t>(sizeof(T))) % 16 == 0 && aligned16(xp) && aligned16(y.data_ptr());
      dice_forward_kernel<T><<<elementwise_blocks(vec ? total / (16 / sizeof(T)) : total, sms), 256, 0, stream>>>(
          xp, reinterpret_cast<T*>(y.data_ptr()), total, C, ch, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return std::make_tuple(y.view(x.sizes()).to(x.scalar_type()), stats);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dice_bwd_cuda(const Tensor& dy, const Tensor& x,
                                                         const std::optional<Tensor>& mask, const Tensor& alpha,
                                                         const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias, const Tensor& stats,
                                                         bool training, double eps) {
  const int64_t C = x.dim() ? x.size(-1) : 0;
  check_dice(x, mask, alpha, C, "dice_bwd");
  check_cuda(dy, x, "dice_bwd", "grad_y");
  check_cuda(stats, x, "dice_bwd", "stats");
  check_channel(weight, x, C, "weight", "dice_bwd");
  check_channel(bias, x, C, "bias", "dice_bwd");
  TORCH_CHECK(dy.sizes() == x.sizes(), "dice_bwd: grad_y must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == C, "dice_bwd: stats must have shape [3, ",
              C, "], got ", stats.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType kt = kernel_dtype(x, alpha);
  return dispatch<true>(kt, "dice: x", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto opt = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int sms = num_sms(x);
    Tensor xc = x.to(kt).contiguous(), dyc = dy.to(kt).contiguous();
    const int64_t N = C ? xc.numel() / C : 0, total = xc.numel();
    Tensor st = stats.to(opt.dtype()).contiguous();
    Tensor m = defined(mask) ? mask->contiguous() : Tensor();
    std::vector<Tensor> keep;
    Channels<A> ch = channels<A>(alpha, weight, bias, st, eps, C, keep);
    const T *xp = reinterpret_cast<const T*>(xc.data_ptr()), *dp = reinterpret_cast<const T*>(dyc.data_ptr());
    Tensor sums = at::zeros({kSums, C}, opt);
    if (N > 0 && C > 0) {
      Reduction red(N, C, sms);
      Tensor part = at::empty({red.R, kSums * C}, opt);
      dice_sums_kernel<T><<<red.grid, dim3(32, kLanes), 0, stream>>>(dp, xp, N, C, red.chunk, ch, part.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sums = sum_slices(part).view({kSums, C});
    }
    Tensor dx = at::empty(xc.sizes(), xc.options());
    if (total > 0) {
      const bool vec = (C * static_cast<int64_t>(sizeof(T))) % 16 == 0 && aligned16(xp) && aligned16(dp) &&
                       aligned16(dx.data_ptr());
      dice_dx_kernel<T><<<elementwise_blocks(vec ? total / (16 / sizeof(T)) : total, sms), 256, 0, stream>>>(
          dp, xp, m.defined() ? m.data_ptr<bool>() : nullptr, reinterpret_cast<T*>(dx.data_ptr()), total, C, ch,
          sums.data_ptr<A>(), st.data_ptr<A>() + 2 * C, training, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const bool has_w = defined(weight), has_b = defined(bias);
    Tensor dalpha = sums[2].clone();
    if (alpha.numel() == 1) dalpha = dalpha.sum().reshape({1});
    return std::make_tuple(dx.view(x.sizes()).to(x.scalar_type()), dalpha.to(alpha.scalar_type()),
                           has_w ? sums[3].to(weight->scalar_type(), false, true) : at::empty({0}, x.options()),
                           has_b ? sums[4].to(bias->scalar_type(), false, true) : at::empty({0}, x.options()));
  });
}

void dice_update_running_cuda(const Tensor& running_mean, const Tensor& running_var, const Tensor& stats,
                              double momentum) {
  const int64_t C = running_mean.numel();
  check_cuda(running_mean, running_mean, "dice_update_running", "running_mean");
  check_cuda(running_var, running_mean, "dice_update_running", "running_var");
  check_cuda(stats, running_mean, "dice_update_running", "stats");
  TORCH_CHECK(running_var.numel() == C && stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == C,
              "dice_update_running: running_mean/running_var must have C = ", C, " entries and stats shape [3, ", C,
              "], got ", running_var.sizes(), " and ", stats.sizes());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "dice_update_running: the running statistics must be contiguous");
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
              "dice_update_running: running_mean and running_var must have one dtype, got ",
              running_mean.scalar_type(), " and ", running_var.scalar_type());
  if (C == 0) return;
  c10::cuda::CUDAGuard guard(running_mean.device());
  Tensor st = stats.to(at::kDouble).contiguous();
  dispatch<true>(running_mean.scalar_type(), "dice_update_running: running_mean", [&](auto tag) {
    using T = decltype(tag);
    dice_update_running_kernel<T><<<static_cast<unsigned>((C + 255) / 256), 256, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<T*>(running_mean.data_ptr()), reinterpret_cast<T*>(running_var.data_ptr()),
        st.data_ptr<double>(), C, momentum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(din_kernels, CUDA, m) {
  m.impl("dice_fwd", &dice_fwd_cuda);
  m.impl("dice_bwd", &dice_bwd_cuda);
  m.impl("dice_update_running", &dice_update_running_cuda);
}

}  // namespace din::cuda
