// Vectorised (ATen at::vec) forms of csrc/common/math.h's activations and the row operations of the CPU kernels.
// Every loop runs whole vectors and ends with one partial (masked) vector, so a row of any width stays vectorised.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <type_traits>

#include "../common/math.h"

namespace din::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// elements [j, j + count) of p, count <= Vec::size() (the masked lanes read as 0)
template <typename T>
inline Vec<T> ld(const T* p, int64_t count) {
  return Vec<T>::loadu(p, count);
}

template <typename T>
inline void st(const Vec<T>& v, T* p, int64_t count) {
  v.store(p, static_cast<int>(count));
}

// calls f(j, count) over [0, n) in vector-sized steps
template <typename T, typename F>
inline void for_vectors(int64_t n, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t j = 0; j < n; j += W) f(j, std::min(W, n - j));
}

template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  // 1 / (1 + exp(-x)): exp(-x) = inf for very negative x gives 0, never NaN
  return (Vec<T>(T(1)) + x.neg().exp_u20()).reciprocal();
}

// h = act(z + bias) for one row of n channels, z updated with the bias (the backward needs the pre-activation);
// a/mean/r: the row's per-channel activation parameters (null when the activation does not use them); bias may be
// null.
template <typename T>
inline void activation_row(int act, T* z, T* h, int64_t n, const T* a, const T* mean, const T* r,
                           const T* bias = nullptr) {
  const Vec<T> zero(T(0)), one(T(1));
  for_vectors<T>(n, [&](int64_t j, int64_t k) {
    Vec<T> x = ld(z + j, k);
    if (bias) {
      x = x + ld(bias + j, k);
      st(x, z + j, k);
    }
    Vec<T> y;
    switch (act) {
      case kSigmoid: y = vsigmoid(x); break;
      case kRelu: y = at::vec::maximum(x, zero); break;
      case kPrelu: y = Vec<T>::blendv(ld(a + j, k) * x, x, x >= zero); break;
      default: {
        Vec<T> al = ld(a + j, k);
        Vec<T> p = vsigmoid((x - ld(mean + j, k)) * ld(r + j, k));
        y = x * (al + (one - al) * p);
      }
    }
    st(y, h + j, k);
  });
}

// dz = act'(z) dh for one row; accumulates the activation parameter's gradient parts into da_acc (PReLU, Dice) and
// writes Dice's g (dL/du, statistics held fixed) into g (null unless act is Dice).
template <typename T>
inline void activation_backward_row(int act, const T* dh, const T* z, const T* h, T* dz, int64_t n, const T* a,
                                    const T* mean, const T* r, T* da_acc, T* g) {
  const Vec<T> zero(T(0)), one(T(1));
  for_vectors<T>(n, [&](int64_t j, int64_t k) {
    Vec<T> d = ld(dh + j, k);
    switch (act) {
      case kSigmoid: {
        Vec<T> y = ld(h + j, k);
        st(d * y * (one - y), dz + j, k);
        break;
      }
      case kRelu:
        st(Vec<T>::blendv(zero, d, ld(h + j, k) > zero), dz + j, k);
        break;
      case kPrelu: {
        Vec<T> x = ld(z + j, k);
        auto pos = x >= zero;
        st(Vec<T>::blendv(ld(a + j, k) * d, d, pos), dz + j, k);
        st(ld(da_acc + j, k) + Vec<T>::blendv(d * x, zero, pos), da_acc + j, k);
        break;
      }
      default: {
        Vec<T> x = ld(z + j, k), al = ld(a + j, k), rr = ld(r + j, k);
        Vec<T> p = vsigmoid((x - ld(mean + j, k)) * rr);
        Vec<T> one_p = one - p;
        Vec<T> gp = d * x * (one - al) * p * one_p;
        st(gp, g + j, k);
        st(at::vec::fmadd(d * x, one_p, ld(da_acc + j, k)), da_acc + j, k);
        st(at::vec::fmadd(rr, gp, d * (al + (one - al) * p)), dz + j, k);
      }
    }
  });
}

// y += alpha * x
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  const Vec<T> va(alpha);
  for_vectors<T>(n, [&](int64_t j, int64_t k) { st(at::vec::fmadd(va, ld(x + j, k), ld(y + j, k)), y + j, k); });
}

// sum_j x[j] * y[j]
template <typename T>
inline T dot(const T* x, const T* y, int64_t n) {
  Vec<T> acc(T(0));
  for_vectors<T>(n, [&](int64_t j, int64_t k) { acc = at::vec::fmadd(ld(x + j, k), ld(y + j, k), acc); });
  return at::vec::vec_reduce_all<T>([](Vec<T>& u, Vec<T>& v) { return u + v; }, acc);
}

// y += x
template <typename T>
inline void add_to(const T* x, T* y, int64_t n) {
  for_vectors<T>(n, [&](int64_t j, int64_t k) { st(ld(y + j, k) + ld(x + j, k), y + j, k); });
}

// The first layer's per-sample gradient epilogue, one row h of dM_b: dA += dm, dWp += dm * q, dq += dm * wp
template <typename T>
inline void first_layer_grads_row(const T* dm, const T* q, const T* wp, T* dA, T* dWp, T* dq, int64_t n) {
  for_vectors<T>(n, [&](int64_t j, int64_t k) {
    Vec<T> d = ld(dm + j, k);
    st(ld(dA + j, k) + d, dA + j, k);
    st(at::vec::fmadd(d, ld(q + j, k), ld(dWp + j, k)), dWp + j, k);
    st(at::vec::fmadd(d, ld(wp + j, k), ld(dq + j, k)), dq + j, k);
  });
}

// Dice's batch sums of one row: sg += g, sgu += g * u with u = (z - mean) * r
template <typename T>
inline void dice_sums_row(const T* g, const T* z, const T* mean, const T* r, T* sg, T* sgu, int64_t n) {
  for_vectors<T>(n, [&](int64_t j, int64_t k) {
    Vec<T> gv = ld(g + j, k);
    Vec<T> u = (ld(z + j, k) - ld(mean + j, k)) * ld(r + j, k);
    st(ld(sg + j, k) + gv, sg + j, k);
    st(at::vec::fmadd(gv, u, ld(sgu + j, k)), sgu + j, k);
  });
}

// Dice's term through the batch statistics at one row of valid positions:
// dz -= r / Nv * (sum_g + u * sum_gu), u = (z - mean) * r, inv_count = 1 / Nv
template <typename T>
inline void dice_correction_row(const T* z, const T* mean, const T* r, const T* sum_g, const T* sum_gu, T inv_count,
                                T* dz, int64_t n) {
  const Vec<T> inv(inv_count);
  for_vectors<T>(n, [&](int64_t j, int64_t k) {
    Vec<T> rv = ld(r + j, k);
    Vec<T> u = (ld(z + j, k) - ld(mean + j, k)) * rv;
    Vec<T> corr = rv * inv * at::vec::fmadd(u, ld(sum_gu + j, k), ld(sum_g + j, k));
    st(ld(dz + j, k) - corr, dz + j, k);
  });
}

// out = T(in) (a dtype conversion of one contiguous run)
template <typename Out, typename In>
inline void convert(const In* in, Out* out, int64_t n) {
  if constexpr (std::is_same_v<Out, In>) {
    std::memcpy(out, in, n * sizeof(Out));
  } else {
    at::vec::convert(in, out, n);
  }
}

}  // namespace din::cpu
