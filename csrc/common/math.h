// The scalar math that the CPU and the CUDA kernels share (SPEC sections 1 and 2): the activations and their
// derivatives, the Dice formulas, the numerically safe sigmoid and the online-softmax merge. Every function is
// DIN_HD (__host__ __device__ under nvcc) and templated on the accumulation type (float or double), so the CPU build
// compiles and tests exactly the code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DIN_HD __host__ __device__ __forceinline__
#else
#define DIN_HD inline
#endif

namespace din {

// activation codes, in the order of the Python names ("sigmoid", "relu", "prelu", "dice")
enum Activation : int { kSigmoid = 0, kRelu = 1, kPrelu = 2, kDice = 3 };

// sigmoid without overflow for large |x|: exp of a non-positive argument only
template <typename T>
DIN_HD T sigmoid(T x) {
  T e = std::exp(-std::fabs(x));
  T inv = T(1) / (T(1) + e);
  return x >= T(0) ? inv : e * inv;
}

// Dice (paper eq. 9) at one element, with r = 1 / sqrt(var + eps):
//   u = (x - mean) * r, p = sigmoid(u), y = x * (alpha + (1 - alpha) * p)
template <typename T>
DIN_HD T dice_gate(T x, T mean, T r) {
  return sigmoid((x - mean) * r);
}

template <typename T>
DIN_HD T dice_forward(T x, T alpha, T p) {
  return x * (alpha + (T(1) - alpha) * p);
}

// The Dice backward at one element, statistics held fixed: returns dL/dx and writes
//   g = dy * x * (1 - alpha) * p * (1 - p)   (dL/du; r * g is its part of dL/dx)
//   dalpha_part = dy * x * (1 - p)
// In training the caller adds, at the positions the statistics were taken over (Nv of them), the term through the
// batch statistics: -r / Nv * (sum g + u * sum g u), as in batch normalisation's backward.
template <typename T>
DIN_HD T dice_backward(T dy, T x, T alpha, T p, T r, T* g, T* dalpha_part) {
  T gp = dy * x * (T(1) - alpha) * p * (T(1) - p);
  *g = gp;
  *dalpha_part = dy * x * (T(1) - p);
  return dy * (alpha + (T(1) - alpha) * p) + r * gp;
}

// Dice's normalised input u = (x - mean) * r
template <typename T>
DIN_HD T dice_u(T x, T mean, T r) {
  return (x - mean) * r;
}

// The Dice backward at one element with the affine gate p = sigmoid(weight * u + bias) (weight = 1 without affine;
// the caller computes p), statistics held fixed: returns dL/dx and writes
//   gp = dy * x * (1 - alpha) * p * (1 - p)   (dL/d(weight * u + bias): d bias's part; gp * u is d weight's part)
//   g = gp * weight                           (dL/du)
//   dalpha_part = dy * x * (1 - p)
// dice_backward is this function with weight = 1 (then g = gp).
template <typename T>
DIN_HD T dice_backward_affine(T dy, T x, T alpha, T p, T r, T weight, T* gp, T* g, T* dalpha_part) {
  T d = dy * x * (T(1) - alpha) * p * (T(1) - p);
  *gp = d;
  *g = d * weight;
  *dalpha_part = dy * x * (T(1) - p);
  return dy * (alpha + (T(1) - alpha) * p) + r * (d * weight);
}

// Dice's term through the batch statistics at a position they were taken over (training), to subtract from dL/dx:
//   r / Nv * (sum_g + u * sum_gu)   with the batch sums of g and g * u over every position, inv_count = 1 / Nv
template <typename T>
DIN_HD T dice_stats_term(T u, T r, T sum_g, T sum_gu, T inv_count) {
  return r * inv_count * (sum_g + u * sum_gu);
}

// One channel's running statistics update from a batch's (mean, biased variance, count), like nn.BatchNorm1d
// (the unbiased variance var * n / max(n - 1, 1)). A channel without positions, or with non-finite statistics, keeps
// its values: returns false and leaves rm, rv unchanged.
DIN_HD bool running_update(double* rm, double* rv, double mean, double var, double n, double momentum) {
  const double unbiased = var * n / (n - 1.0 > 1.0 ? n - 1.0 : 1.0);
  if (!(n > 0) || !std::isfinite(mean) || !std::isfinite(unbiased)) return false;
  *rm = (1 - momentum) * *rm + momentum * mean;
  *rv = (1 - momentum) * *rv + momentum * unbiased;
  return true;
}

// One hidden activation forward. a: the PReLU weight or the Dice alpha; mean, r: Dice's statistics.
template <typename T>
DIN_HD T activation_forward(int act, T z, T a, T mean, T r) {
  switch (act) {
    case kSigmoid: return sigmoid(z);
    case kRelu: return z > T(0) ? z : T(0);
    case kPrelu: return z >= T(0) ? z : a * z;
    default: return dice_forward(z, a, dice_gate(z, mean, r));
  }
}

// One hidden activation backward (Dice: statistics held fixed, see dice_backward). h is the forward's output.
// Writes the activation parameter's gradient part (PReLU: dh * z where z < 0; Dice: dy x (1 - p)) and Dice's g.
template <typename T>
DIN_HD T activation_backward(int act, T dh, T z, T h, T a, T mean, T r, T* da_part, T* g) {
  *da_part = T(0);
  *g = T(0);
  switch (act) {
    case kSigmoid: return dh * h * (T(1) - h);
    case kRelu: return h > T(0) ? dh : T(0);
    case kPrelu:
      if (z >= T(0)) return dh;
      *da_part = dh * z;
      return a * dh;
    default: return dice_backward(dh, z, a, dice_gate(z, mean, r), r, g, da_part);
  }
}

// Online softmax state of one sample (flash-attention's merge): running max m and sum of exp(l - m).
template <typename T>
struct SoftmaxState {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);

  DIN_HD void add(T logit) {
    if (logit > max) {
      sum = sum * std::exp(max - logit) + T(1);
      max = logit;
    } else {
      sum += std::exp(logit - max);
    }
  }

  DIN_HD void merge(const SoftmaxState& other) {
    if (other.sum == T(0)) return;
    if (sum == T(0)) {
      *this = other;
      return;
    }
    T m = max > other.max ? max : other.max;
    sum = sum * std::exp(max - m) + other.sum * std::exp(other.max - m);
    max = m;
  }

  // the weight of a logit; 0 for an empty sample (never NaN)
  DIN_HD T weight(T logit) const { return sum > T(0) ? std::exp(logit - max) / sum : T(0); }
};

// Chan et al.'s merge of (count, mean, M2) partial moments: exact, order-fixed, for the Dice batch statistics.
template <typename T>
DIN_HD void merge_moments(T* n, T* mean, T* m2, T n_b, T mean_b, T m2_b) {
  T total = *n + n_b;
  if (n_b == T(0)) return;
  T delta = mean_b - *mean;
  T frac = n_b / total;
  *mean += delta * frac;
  *m2 += m2_b + delta * delta * *n * frac;
  *n = total;
}

// Clamped range of sample b: padded rows b*T .. b*T + clamp(lengths[b], 0, T); jagged
// start = clamp(offsets[b], 0, N), end = clamp(offsets[b + 1], start, N). Memory-safe for any index values.
DIN_HD void sample_range(const int64_t* lengths, const int64_t* offsets, int64_t b, int64_t T, int64_t N,
                         int64_t* start, int64_t* length) {
  if (offsets != nullptr) {
    int64_t s = offsets[b], e = offsets[b + 1];
    s = s < 0 ? 0 : (s > N ? N : s);
    e = e < s ? s : (e > N ? N : e);
    *start = s;
    *length = e - s;
  } else {
    int64_t l = lengths[b];
    *start = b * T;
    *length = l < 0 ? 0 : (l > T ? T : l);
  }
}

}  // namespace din
