// Dice (SPEC section 2) on the CPU: din_kernels::dice_fwd, dice_bwd and dice_update_running (schemas in
// din_kernels/ops/schema.py). x is viewed as [N, C] (positions x channels), the mask as [N].
//
// Forward in training: the batch statistics in one read of x (tiles of kTileRows rows: each tile's mean and centred
// squares while it is in L1, merged with Chan's formula into its group's moments; the kGroups groups of consecutive
// rows are merged in order, so the result is bit-for-bit the same for any thread count), then one elementwise pass
//   y = x * (alpha + (1 - alpha) * p),  p = sigmoid(weight * (x - mean) * r + bias),  r = 1 / sqrt(var + eps).
// Backward: one reduction pass for the per-channel sums (sum g, sum g u, d alpha, d weight, d bias; see
// din_kernels/torch_impl/dice.py for the formulas) and one elementwise pass for dx. Nothing of size [N, C] is kept.
// Each pass computes the gate and its result in one loop over a row's vectors; float32/float64 rows are read and
// written where they are, 16-bit rows go through a float32 row buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "vec_math.h"

namespace din::cpu {
namespace {

using at::Tensor;

constexpr int64_t kTileRows = 64;
constexpr int64_t kGroups = 16;  // reduction groups: a fixed number, so the sums' order (and result) is the same for
                                 // any thread count

int64_t num_groups(int64_t n_rows) {
  const int64_t tiles = (n_rows + kTileRows - 1) / kTileRows;
  return std::max<int64_t>(1, std::min<int64_t>(kGroups, tiles));
}

// rows [begin, end) of group g of P
std::pair<int64_t, int64_t> group_rows(int64_t N, int64_t g, int64_t P) {
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  return {std::min(N, tiles * g / P * kTileRows), std::min(N, tiles * (g + 1) / P * kTileRows)};
}

template <typename acc_t>
struct Channels {  // per-channel parameters in acc_t (weight, bias: empty without them)
  std::vector<acc_t> alpha, weight, bias, mean, r;
  const acc_t* w() const { return weight.empty() ? nullptr : weight.data(); }
  const acc_t* b() const { return bias.empty() ? nullptr : bias.data(); }
};

// One row of the input in acc_t: the row itself when the types match, else its conversion in a buffer; and the
// row an output is computed into (the output itself, or a buffer that flush() converts into it).
template <typename scalar_t, typename acc_t>
struct RowBuffer {
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> buf;
  explicit RowBuffer(int64_t C) : buf(kSame ? 0 : C) {}
  const acc_t* in(const scalar_t* p, int64_t C) {
    if constexpr (kSame) {
      return p;
    } else {
      convert(p, buf.data(), C);
      return buf.data();
    }
  }
  acc_t* out(scalar_t* p) {
    if constexpr (kSame) {
      return p;
    } else {
      return buf.data();
    }
  }
  void flush(scalar_t* p, int64_t C) {
    if constexpr (!kSame) convert(buf.data(), p, C);
  }
};

// u = (x - mean) r and the gate p = sigmoid(weight u + bias) of lanes [j, j + k)
template <typename acc_t>
struct Gate {
  Vec<acc_t> u, p;
};

template <typename acc_t>
inline Gate<acc_t> gate(const Vec<acc_t>& x, const Channels<acc_t>& ch, const acc_t* w, const acc_t* b, int64_t j,
                        int64_t k) {
  Vec<acc_t> u = (x - ld(ch.mean.data() + j, k)) * ld(ch.r.data() + j, k);
  Vec<acc_t> a = w ? u * ld(w + j, k) : u;
  if (b) a = a + ld(b + j, k);
  return {u, vsigmoid(a)};
}

// y = x (alpha + (1 - alpha) p) for one row
template <typename acc_t>
inline void forward_row(const acc_t* x, acc_t* y, int64_t C, const Channels<acc_t>& ch) {
  const acc_t *al = ch.alpha.data(), *w = ch.w(), *b = ch.b();
  const Vec<acc_t> one(acc_t(1));
  for_vectors<acc_t>(C, [&](int64_t j, int64_t k) {
    Vec<acc_t> xv = ld(x + j, k), a = ld(al + j, k);
    st(xv * (a + (one - a) * gate(xv, ch, w, b, j, k).p), y + j, k);
  });
}

// Backward pass 1 at one row: per-channel sums of g = gp * weight, g * u, dy x (1 - p), gp * u and gp, where
// gp = dy x (1 - alpha) p (1 - p) (weight: null without affine)
template <typename T>
inline void backward_sums_row(const T* x, const T* dy, const Channels<T>& ch, T* sg, T* sgu, T* sa, T* sw, T* sb,
                              int64_t C) {
  const T *al = ch.alpha.data(), *w = ch.w(), *b = ch.b();
  const Vec<T> one(T(1));
  for_vectors<T>(C, [&](int64_t j, int64_t k) {
    Vec<T> xv = ld(x + j, k);
    Gate<T> gt = gate(xv, ch, w, b, j, k);
    Vec<T> one_p = one - gt.p;
    Vec<T> dyx = ld(dy + j, k) * xv;
    Vec<T> gp = dyx * (one - ld(al + j, k)) * gt.p * one_p;
    Vec<T> g = w ? gp * ld(w + j, k) : gp;
    st(ld(sg + j, k) + g, sg + j, k);
    st(at::vec::fmadd(g, gt.u, ld(sgu + j, k)), sgu + j, k);
    st(at::vec::fmadd(dyx, one_p, ld(sa + j, k)), sa + j, k);
    st(at::vec::fmadd(gp, gt.u, ld(sw + j, k)), sw + j, k);
    st(ld(sb + j, k) + gp, sb + j, k);
  });
}

// Backward pass 2 at one row: dx = dy (alpha + (1 - alpha) p) + r g [- r / Nv (sum g + u sum g u) when sum_g is
// given: a position the statistics were taken over, in training]
template <typename T>
inline void backward_dx_row(const T* x, const T* dy, T* dx, const Channels<T>& ch, const T* sum_g, const T* sum_gu,
                            T inv_n, int64_t C) {
  const T *al = ch.alpha.data(), *w = ch.w(), *b = ch.b(), *r = ch.r.data();
  const Vec<T> one(T(1)), inv(inv_n);
  for_vectors<T>(C, [&](int64_t j, int64_t k) {
    Vec<T> xv = ld(x + j, k), a = ld(al + j, k), dyv = ld(dy + j, k), rv = ld(r + j, k);
    Gate<T> gt = gate(xv, ch, w, b, j, k);
    Vec<T> gp = dyv * xv * (one - a) * gt.p * (one - gt.p);
    Vec<T> g = w ? gp * ld(w + j, k) : gp;
    Vec<T> v = at::vec::fmadd(rv, g, dyv * (a + (one - a) * gt.p));
    if (sum_g) v = v - rv * inv * at::vec::fmadd(gt.u, ld(sum_gu + j, k), ld(sum_g + j, k));
    st(v, dx + j, k);
  });
}

template <typename scalar_t, typename acc_t>
Tensor batch_stats(const scalar_t* x, const bool* mask, int64_t N, int64_t C, const at::TensorOptions& opt) {
  const int64_t P = num_groups(N);
  std::vector<acc_t> cnt(P, 0), mean(P * C, 0), m2(P * C, 0);
  at::parallel_for(0, P, 1, [&](int64_t g0, int64_t g1) {
    std::vector<acc_t> tile(kTileRows * C), sum(C), sq(C);
    for (int64_t g = g0; g < g1; ++g) {
      auto [r0, r1] = group_rows(N, g, P);
      for (int64_t t0 = r0; t0 < r1; t0 += kTileRows) {
        int64_t n = 0;
        const acc_t* rows = tile.data();  // the tile's (selected) rows in acc_t: x itself when unmasked and acc_t
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (!mask) {
            rows = x + t0 * C;
            n = std::min(r1, t0 + kTileRows) - t0;
          }
        }
        if (n == 0) {  // converted (and selected) into the tile
          for (int64_t r = t0; r < std::min(r1, t0 + kTileRows); ++r) {
            if (mask && !mask[r]) continue;
            convert(x + r * C, tile.data() + n * C, C);
            ++n;
          }
        }
        if (n == 0) continue;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        std::fill(sq.begin(), sq.end(), acc_t(0));
        for (int64_t i = 0; i < n; ++i) add_to<acc_t>(rows + i * C, sum.data(), C);
        for (int64_t j = 0; j < C; ++j) sum[j] /= acc_t(n);
        for (int64_t i = 0; i < n; ++i) {
          const acc_t* row = rows + i * C;
          for_vectors<acc_t>(C, [&](int64_t j, int64_t k) {
            Vec<acc_t> d = ld(row + j, k) - ld(sum.data() + j, k);
            st(at::vec::fmadd(d, d, ld(sq.data() + j, k)), sq.data() + j, k);
          });
        }
        for (int64_t j = 0; j < C; ++j) {
          acc_t n_j = cnt[g];
          merge_moments<acc_t>(&n_j, &mean[g * C + j], &m2[g * C + j], acc_t(n), sum[j], sq[j]);
        }
        cnt[g] += acc_t(n);
      }
    }
  });
  Tensor stats = at::zeros({3, C}, opt);
  acc_t *mu = stats[0].data_ptr<acc_t>(), *var = stats[1].data_ptr<acc_t>(), *count = stats[2].data_ptr<acc_t>();
  std::vector<acc_t> M2(C, 0);
  acc_t n_all = 0;
  for (int64_t g = 0; g < P; ++g) {
    for (int64_t j = 0; j < C; ++j) {
      acc_t n_j = n_all;
      merge_moments<acc_t>(&n_j, &mu[j], &M2[j], cnt[g], mean[g * C + j], m2[g * C + j]);
    }
    n_all += cnt[g];
  }
  for (int64_t j = 0; j < C; ++j) {
    var[j] = n_all > 0 ? M2[j] / n_all : acc_t(0);
    count[j] = n_all;
  }
  return stats;
}

void check_dice(const Tensor& x, const std::optional<Tensor>& mask, const Tensor& alpha, int64_t C, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor [..., C], got ",
              x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(alpha.dim() == 1 && (alpha.numel() == 1 || alpha.numel() == C), op, ": alpha must have shape [", C,
              "] or [1], got ", alpha.sizes());
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == x.sizes().slice(0, x.dim() - 1), op, ": mask must have shape ",
                x.sizes().slice(0, x.dim() - 1), ", got ", mask->sizes());
  }
}

void check_channel(const std::optional<Tensor>& t, int64_t C, const char* name, const char* op) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->dim() == 1 && t->numel() == C, op, ": ", name, " must have shape [", C, "], got ", t->sizes());
}

template <typename acc_t>
Tensor acc(const Tensor& t, int64_t C) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).expand({C}).contiguous();
}

// the C values of a per-channel parameter ([C] or [1]) in acc_t
template <typename acc_t>
std::vector<acc_t> channel_values(const Tensor& t, int64_t C) {
  Tensor c = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // itself when already so
  const acc_t* p = c.data_ptr<acc_t>();
  std::vector<acc_t> v(C);
  for (int64_t j = 0; j < C; ++j) v[j] = p[c.numel() == 1 ? 0 : j];
  return v;
}

// the parameters, with mean and var [C] in acc_t
template <typename acc_t>
Channels<acc_t> channels(const Tensor& alpha, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                         const acc_t* mean, const acc_t* var, double eps, int64_t C) {
  Channels<acc_t> ch;
  ch.alpha = channel_values<acc_t>(alpha, C);
  if (weight.has_value() && weight->defined()) ch.weight = channel_values<acc_t>(*weight, C);
  if (bias.has_value() && bias->defined()) ch.bias = channel_values<acc_t>(*bias, C);
  ch.mean.assign(mean, mean + C);
  ch.r.resize(C);
  for (int64_t j = 0; j < C; ++j) ch.r[j] = acc_t(1) / std::sqrt(var[j] + acc_t(eps));
  return ch;
}

bool uses_double(const Tensor& x, const Tensor& alpha) {
  return x.scalar_type() == at::kDouble || alpha.scalar_type() == at::kDouble;
}

#define DIN_DISPATCH_DICE(x, alpha, ...)                                                                 \
  [&] {                                                                                                  \
    if (uses_double(x, alpha)) {                                                                         \
      using scalar_t = double;                                                                           \
      using acc_t = double;                                                                              \
      return __VA_ARGS__();                                                                              \
    }                                                                                                    \
    switch (x.scalar_type()) {                                                                           \
      case at::kFloat: {                                                                                 \
        using scalar_t = float;                                                                          \
        using acc_t = float;                                                                             \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case at::kBFloat16: {                                                                              \
        using scalar_t = at::BFloat16;                                                                   \
        using acc_t = float;                                                                             \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case at::kHalf: {                                                                                  \
        using scalar_t = at::Half;                                                                       \
        using acc_t = float;                                                                             \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      default:                                                                                           \
        TORCH_CHECK(false, "dice: x must be float32, float64, bfloat16 or float16, got ", x.scalar_type()); \
    }                                                                                                    \
  }()

template <typename scalar_t>
Tensor as_rows(const Tensor& x) {
  return x.to(c10::CppTypeToScalarType<scalar_t>::value).contiguous();
}

// The unmasked input seen as wide rows ("spans") of k whole rows, S = k C elements, so that short channel counts
// still run full vectors without per-row overhead; the per-channel parameters are tiled k times. The last N mod k
// rows keep their width C. Lane j of a span is channel j % C.
struct Spans {
  int64_t k = 1, S = 0, Nf = 0, Nt = 0;  // rows per span, span width, full spans, remaining rows
};

template <typename acc_t>
Spans spans_of(int64_t N, int64_t C) {
  Spans sp;
  if (C == 0) return sp;
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t k0 = W / std::gcd(C, W);  // the fewest rows whose width is a multiple of the vector width
  sp.k = k0 * std::max<int64_t>(1, (256 + k0 * C - 1) / (k0 * C));  // spans of at least 256 elements
  sp.S = sp.k * C;
  sp.Nf = N / sp.k;
  sp.Nt = N - sp.Nf * sp.k;
  return sp;
}

template <typename acc_t>
Channels<acc_t> tiled(const Channels<acc_t>& ch, int64_t k) {
  auto rep = [&](const std::vector<acc_t>& v) {
    std::vector<acc_t> out;
    out.reserve(v.size() * k);
    for (int64_t i = 0; i < k; ++i) out.insert(out.end(), v.begin(), v.end());
    return out;
  };
  return {rep(ch.alpha), rep(ch.weight), rep(ch.bias), rep(ch.mean), rep(ch.r)};
}

// y = x (alpha + (1 - alpha) p) for N rows of width C
template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* xp, scalar_t* yp, int64_t N, int64_t C, const Channels<acc_t>& ch) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    RowBuffer<scalar_t, acc_t> xb(C), yb(C);
    for (int64_t r = r0; r < r1; ++r) {
      forward_row<acc_t>(xb.in(xp + r * C, C), yb.out(yp + r * C), C, ch);
      yb.flush(yp + r * C, C);
    }
  });
}

constexpr int kSums = 5;  // backward pass 1: sum g, sum g u, d alpha, d weight, d bias (per channel)

// backward pass 1 over N rows of width C: the kSums sums per lane [kSums, C], in P ordered groups (deterministic)
template <typename scalar_t, typename acc_t>
std::vector<acc_t> backward_sums(const scalar_t* xp, const scalar_t* dyp, int64_t N, int64_t C,
                                 const Channels<acc_t>& ch) {
  const int64_t P = num_groups(N);
  std::vector<acc_t> part(P * kSums * C, 0);
  at::parallel_for(0, P, 1, [&](int64_t g0, int64_t g1) {
    RowBuffer<scalar_t, acc_t> xb(C), db(C);
    for (int64_t g = g0; g < g1; ++g) {
      auto [r0, r1] = group_rows(N, g, P);
      acc_t *sg = part.data() + g * kSums * C, *sgu = sg + C, *sa = sgu + C, *sw = sa + C, *sb = sw + C;
      for (int64_t r = r0; r < r1; ++r)
        backward_sums_row<acc_t>(xb.in(xp + r * C, C), db.in(dyp + r * C, C), ch, sg, sgu, sa, sw, sb, C);
    }
  });
  std::vector<acc_t> sums(kSums * C, 0);
  for (int64_t g = 0; g < P; ++g) add_to<acc_t>(part.data() + g * kSums * C, sums.data(), kSums * C);
  return sums;
}

// backward pass 2 over N rows of width C: dx, with the statistics' term where corr(row) (SG/SGU: [C] per lane)
template <typename scalar_t, typename acc_t, typename Corr>
void backward_dx(const scalar_t* xp, const scalar_t* dyp, scalar_t* dxp, int64_t N, int64_t C,
                 const Channels<acc_t>& ch, const acc_t* SG, const acc_t* SGU, acc_t inv_n, const Corr& corr) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    RowBuffer<scalar_t, acc_t> xb(C), db(C), outb(C);
    for (int64_t r = r0; r < r1; ++r) {
      backward_dx_row<acc_t>(xb.in(xp + r * C, C), db.in(dyp + r * C, C), outb.out(dxp + r * C), ch,
                             corr(r) ? SG : nullptr, SGU, inv_n, C);
      outb.flush(dxp + r * C, C);
    }
  });
}

// per-channel moments [3, C] of unmasked rows: the spans' lane moments merged per channel, then the last rows'
template <typename scalar_t, typename acc_t>
Tensor unmasked_stats(const scalar_t* xp, int64_t N, int64_t C, const Spans& sp, const at::TensorOptions& opt) {
  Tensor lanes = batch_stats<scalar_t, acc_t>(xp, nullptr, sp.Nf, sp.S, opt);
  Tensor tail = batch_stats<scalar_t, acc_t>(xp + sp.Nf * sp.S, nullptr, sp.Nt, C, opt);
  Tensor stats = at::zeros({3, C}, opt);
  const acc_t *lm = lanes[0].data_ptr<acc_t>(), *lv = lanes[1].data_ptr<acc_t>();
  const acc_t *tm = tail[0].data_ptr<acc_t>(), *tv = tail[1].data_ptr<acc_t>();
  acc_t *mean = stats[0].data_ptr<acc_t>(), *var = stats[1].data_ptr<acc_t>(), *count = stats[2].data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    acc_t n = 0, mu = 0, m2 = 0;
    for (int64_t j = c; j < sp.S; j += C) {  // each lane of a channel holds Nf rows
      acc_t n_j = n;
      merge_moments<acc_t>(&n_j, &mu, &m2, acc_t(sp.Nf), lm[j], lv[j] * acc_t(sp.Nf));
      n += acc_t(sp.Nf);
    }
    acc_t n_t = n;
    merge_moments<acc_t>(&n_t, &mu, &m2, acc_t(sp.Nt), tm[c], tv[c] * acc_t(sp.Nt));
    n += acc_t(sp.Nt);
    mean[c] = mu;
    var[c] = n > 0 ? m2 / n : acc_t(0);
    count[c] = n;
  }
  return stats;
}

std::tuple<Tensor, Tensor> dice_fwd_cpu(const Tensor& x, const std::optional<Tensor>& mask, const Tensor& alpha,
                                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                        const std::optional<Tensor>& running_mean,
                                        const std::optional<Tensor>& running_var, bool training, double eps) {
  const int64_t C = x.dim() ? x.size(-1) : 0;
  check_dice(x, mask, alpha, C, "dice_fwd");
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"},
                         {&running_var, "running_var"}})
    check_channel(*t, C, name, "dice_fwd");
  TORCH_CHECK(training || (running_mean.has_value() && running_var.has_value()),
              "dice_fwd: eval mode (training=False) needs running_mean and running_var");
  return DIN_DISPATCH_DICE(x, alpha, [&] {
    const auto opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    Tensor xc = as_rows<scalar_t>(x);
    const int64_t N = C ? xc.numel() / C : 0;
    Tensor m = mask.has_value() && mask->defined() ? mask->contiguous() : Tensor();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const Spans sp = spans_of<acc_t>(N, C);
    Tensor stats = !training  ? at::stack({acc<acc_t>(*running_mean, C), acc<acc_t>(*running_var, C),
                                           at::zeros({C}, opt)})
                   : m.defined() ? batch_stats<scalar_t, acc_t>(xp, m.data_ptr<bool>(), N, C, opt)
                                 : unmasked_stats<scalar_t, acc_t>(xp, N, C, sp, opt);
    Channels<acc_t> ch = channels<acc_t>(alpha, weight, bias, stats[0].data_ptr<acc_t>(),
                                         stats[1].data_ptr<acc_t>(), eps, C);
    Tensor y = at::empty(xc.sizes(), xc.options());
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (sp.Nf) forward_rows<scalar_t, acc_t>(xp, yp, sp.Nf, sp.S, tiled(ch, sp.k));
    forward_rows<scalar_t, acc_t>(xp + sp.Nf * sp.S, yp + sp.Nf * sp.S, sp.Nt, C, ch);
    return std::make_tuple(y.view(x.sizes()).to(x.scalar_type()), stats);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dice_bwd_cpu(const Tensor& dy, const Tensor& x,
                                                        const std::optional<Tensor>& mask, const Tensor& alpha,
                                                        const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, const Tensor& stats,
                                                        bool training, double eps) {
  const int64_t C = x.dim() ? x.size(-1) : 0;
  check_dice(x, mask, alpha, C, "dice_bwd");
  check_channel(weight, C, "weight", "dice_bwd");
  check_channel(bias, C, "bias", "dice_bwd");
  TORCH_CHECK(dy.sizes() == x.sizes(), "dice_bwd: grad_y must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == C, "dice_bwd: stats must have shape [3, ",
              C, "], got ", stats.sizes());
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  return DIN_DISPATCH_DICE(x, alpha, [&] {
    const auto opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    Tensor xc = as_rows<scalar_t>(x), dyc = as_rows<scalar_t>(dy);
    const int64_t N = C ? xc.numel() / C : 0;
    Tensor m = mask.has_value() && mask->defined() ? mask->contiguous() : Tensor();
    const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
    Tensor st = stats.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* st_p = st.data_ptr<acc_t>();
    Channels<acc_t> ch = channels<acc_t>(alpha, weight, bias, st_p, st_p + C, eps, C);
    const acc_t count = C ? st_p[2 * C] : acc_t(0);
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *dyp = dyc.data_ptr<scalar_t>();
    Tensor dx = at::empty(xc.sizes(), xc.options());
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const acc_t inv_n = count > 0 ? acc_t(1) / count : acc_t(0);
    std::vector<acc_t> sums;
    if (mp) {  // masked: row by row (the statistics' term only at the selected rows)
      sums = backward_sums<scalar_t, acc_t>(xp, dyp, N, C, ch);
      backward_dx<scalar_t, acc_t>(xp, dyp, dxp, N, C, ch, sums.data(), sums.data() + C, inv_n,
                                   [&](int64_t r) { return training && mp[r]; });
    } else {  // spans of k rows, then the last rows; the spans' lane sums fold into channels
      const Spans sp = spans_of<acc_t>(N, C);
      const Channels<acc_t> wide = tiled(ch, sp.k);
      sums = backward_sums<scalar_t, acc_t>(xp + sp.Nf * sp.S, dyp + sp.Nf * sp.S, sp.Nt, C, ch);
      if (sp.Nf) {
        std::vector<acc_t> lanes = backward_sums<scalar_t, acc_t>(xp, dyp, sp.Nf, sp.S, wide);
        for (int q = 0; q < kSums; ++q)
          for (int64_t j = 0; j < sp.S; ++j) sums[q * C + j % C] += lanes[q * sp.S + j];
      }
      std::vector<acc_t> sg_wide(sp.S), sgu_wide(sp.S);
      for (int64_t j = 0; j < sp.S; ++j) {
        sg_wide[j] = sums[j % C];
        sgu_wide[j] = sums[C + j % C];
      }
      auto all = [&](int64_t) { return training; };
      if (sp.Nf)
        backward_dx<scalar_t, acc_t>(xp, dyp, dxp, sp.Nf, sp.S, wide, sg_wide.data(), sgu_wide.data(), inv_n, all);
      const int64_t off = sp.Nf * sp.S;
      backward_dx<scalar_t, acc_t>(xp + off, dyp + off, dxp + off, sp.Nt, C, ch, sums.data(), sums.data() + C, inv_n,
                                   all);
    }
    Tensor dalpha = at::empty({C}, opt);
    std::memcpy(dalpha.data_ptr<acc_t>(), sums.data() + 2 * C, C * sizeof(acc_t));
    if (alpha.numel() == 1) dalpha = dalpha.sum().reshape({1});
    Tensor dw = at::empty({has_w ? C : 0}, opt), db = at::empty({has_b ? C : 0}, opt);
    if (has_w) std::memcpy(dw.data_ptr<acc_t>(), sums.data() + 3 * C, C * sizeof(acc_t));
    if (has_b) std::memcpy(db.data_ptr<acc_t>(), sums.data() + 4 * C, C * sizeof(acc_t));
    return std::make_tuple(dx.view(x.sizes()).to(x.scalar_type()), dalpha.to(alpha.scalar_type()),
                           has_w ? dw.to(weight->scalar_type()) : at::empty({0}, x.options()),
                           has_b ? db.to(bias->scalar_type()) : at::empty({0}, x.options()));
  });
}

void dice_update_running_cpu(const Tensor& running_mean, const Tensor& running_var, const Tensor& stats,
                             double momentum) {
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_var.numel() == C && stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == C,
              "dice_update_running: running_mean/running_var must have C = ", C, " entries and stats shape [3, ", C,
              "], got ", running_var.sizes(), " and ", stats.sizes());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "dice_update_running: the running statistics must be contiguous");
  Tensor st = stats.to(at::kDouble).contiguous();
  const double *mean = st[0].data_ptr<double>(), *var = st[1].data_ptr<double>(), *n = st[2].data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "dice_update_running", [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    for (int64_t j = 0; j < C; ++j) {
      const double unbiased = var[j] * n[j] / std::max(n[j] - 1.0, 1.0);
      // a channel without positions, or with non-finite statistics, keeps its running values
      if (!(n[j] > 0) || !std::isfinite(mean[j]) || !std::isfinite(unbiased)) continue;
      rm[j] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(rm[j]) + momentum * mean[j]);
      rv[j] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(rv[j]) + momentum * unbiased);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(din_kernels, CPU, m) {
  m.impl("dice_fwd", &dice_fwd_cpu);
  m.impl("dice_bwd", &dice_bwd_cpu);
  m.impl("dice_update_running", &dice_update_running_cpu);
}

}  // namespace din::cpu
