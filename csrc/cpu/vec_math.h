// Vectorised (ATen at::vec) forms of csrc/common/math.h's activations, for rows of the CPU kernels. Each loop runs
// full vectors, then the scalar formula of math.h on the tail, so both paths compute the same function.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../common/math.h"

namespace din::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  // 1 / (1 + exp(-x)): exp(-x) = inf for very negative x gives 0, never NaN
  return (Vec<T>(T(1)) + x.neg().exp_u20()).reciprocal();
}

// h = act(z) for one row of n channels; a/mean/r: the row's per-channel activation parameters (may be null when the
// activation does not use them)
template <typename T>
inline void activation_row(int act, const T* z, T* h, int64_t n, const T* a, const T* mean, const T* r) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  const Vec<T> zero(T(0)), one(T(1));
  for (; j + W <= n; j += W) {
    Vec<T> x = Vec<T>::loadu(z + j);
    Vec<T> y;
    switch (act) {
      case kSigmoid: y = vsigmoid(x); break;
      case kRelu: y = at::vec::maximum(x, zero); break;
      case kPrelu: y = Vec<T>::blendv(Vec<T>::loadu(a + j) * x, x, x >= zero); break;
      default: {
        Vec<T> al = Vec<T>::loadu(a + j);
        Vec<T> p = vsigmoid((x - Vec<T>::loadu(mean + j)) * Vec<T>::loadu(r + j));
        y = x * (al + (one - al) * p);
      }
    }
    y.store(h + j);
  }
  for (; j < n; ++j) {
    h[j] = activation_forward<T>(act, z[j], a ? a[j] : T(0), mean ? mean[j] : T(0), r ? r[j] : T(1));
  }
}

// dz = act'(z) dh for one row; accumulates the activation parameter's gradient parts into da_acc (PReLU, Dice) and
// writes Dice's g (dL/du) into g (may be null unless act is Dice).
template <typename T>
inline void activation_backward_row(int act, const T* dh, const T* z, const T* h, T* dz, int64_t n, const T* a,
                                    const T* mean, const T* r, T* da_acc, T* g) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  const Vec<T> zero(T(0)), one(T(1));
  for (; j + W <= n; j += W) {
    Vec<T> d = Vec<T>::loadu(dh + j);
    switch (act) {
      case kSigmoid: {
        Vec<T> y = Vec<T>::loadu(h + j);
        (d * y * (one - y)).store(dz + j);
        break;
      }
      case kRelu:
        Vec<T>::blendv(zero, d, Vec<T>::loadu(h + j) > zero).store(dz + j);
        break;
      case kPrelu: {
        Vec<T> x = Vec<T>::loadu(z + j);
        auto pos = x >= zero;
        Vec<T>::blendv(Vec<T>::loadu(a + j) * d, d, pos).store(dz + j);
        (Vec<T>::loadu(da_acc + j) + Vec<T>::blendv(d * x, zero, pos)).store(da_acc + j);
        break;
      }
      default: {
        Vec<T> x = Vec<T>::loadu(z + j), al = Vec<T>::loadu(a + j), rr = Vec<T>::loadu(r + j);
        Vec<T> p = vsigmoid((x - Vec<T>::loadu(mean + j)) * rr);
        Vec<T> one_p = one - p;
        Vec<T> gp = d * x * (one - al) * p * one_p;
        gp.store(g + j);
        (Vec<T>::loadu(da_acc + j) + d * x * one_p).store(da_acc + j);
        (d * (al + (one - al) * p) + rr * gp).store(dz + j);
      }
    }
  }
  for (; j < n; ++j) {
    T da_part, gj;
    dz[j] = activation_backward<T>(act, dh[j], z[j], h[j], a ? a[j] : T(0), mean ? mean[j] : T(0), r ? r[j] : T(1),
                                   &da_part, &gj);
    if (da_acc) da_acc[j] += da_part;
    if (g) g[j] = gj;
  }
}

// y[j] += alpha * x[j]
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  const Vec<T> va(alpha);
  for (; j + W <= n; j += W) at::vec::fmadd(va, Vec<T>::loadu(x + j), Vec<T>::loadu(y + j)).store(y + j);
  for (; j < n; ++j) y[j] += alpha * x[j];
}

// sum_j x[j] * y[j]
template <typename T>
inline T dot(const T* x, const T* y, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  Vec<T> acc(T(0));
  for (; j + W <= n; j += W) acc = at::vec::fmadd(Vec<T>::loadu(x + j), Vec<T>::loadu(y + j), acc);
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& u, Vec<T>& v) { return u + v; }, acc);
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

// y[j] += x[j]
template <typename T>
inline void add_to(const T* x, T* y, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec<T>::loadu(y + j) + Vec<T>::loadu(x + j)).store(y + j);
  for (; j < n; ++j) y[j] += x[j];
}

// out[j] = T(in[j]) (a dtype conversion of one contiguous run)
template <typename Out, typename In>
inline void convert(const In* in, Out* out, int64_t n) {
  if constexpr (std::is_same_v<Out, In>) {
    std::memcpy(out, in, n * sizeof(Out));
  } else {
    at::vec::convert(in, out, n);
  }
}

}  // namespace din::cpu
