// BatchNorm in training mode, with the ReLU (and the residual addition) that
// follows it in the ResNets, as XLA FFI kernels on all of XLA's CPU threads
// (adaptive_vision/cpu/native/norm.py registers them).
//
// Why: XLA:CPU runs its elementwise and reduction fusions on one thread, so
// while the native convolutions use both cores of a 2-core machine, the
// BatchNorm/ReLU passes of the ResNet-20 step (about a quarter of it) leave
// one core idle (results/bench_notes.md).
//
// Layout: x is [n, C] (all axes but the channels flattened). Rows are split
// into a fixed number of blocks; per-block channel sums are added in a fixed
// order, in double, so results do not depend on the number of threads.
//
//   forward:  y = act(scale * (x - mean) * inv + bias [+ residual]),
//             mean = E[x], var = max(0, E[x^2] - mean^2), inv = 1/sqrt(var + eps)
//   backward: g = dy * (y > 0 if relu), dbias = sum g, dscale = sum g * xhat,
//             dx = scale * inv / n * (n g - dbias - xhat dscale)
//                  + (dmean + 2 dvar' (x - mean)) / n     (dvar' = 0 where var = 0)
//             d residual = g
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "parallel.h"

namespace {

using Array = ffi::Buffer<ffi::F32>;  // any rank; the last axis is the channels
using ArrayOut = ffi::ResultBuffer<ffi::F32>;

constexpr int64_t kBlocks = 64;  // row blocks (work items), fixed for determinism

struct Rows {
  int64_t n, c;
};

Rows rows_of(const Array& x) {
  auto d = x.dimensions();
  int64_t c = d.size() == 0 ? 1 : d[d.size() - 1];
  return {c ? static_cast<int64_t>(x.element_count()) / c : 0, c};
}

int64_t num_blocks(Rows r) { return std::max<int64_t>(1, std::min(kBlocks, r.n)); }

// f(b, lo, hi) for every row block b = [lo, hi), on all threads.
template <typename F>
void for_row_blocks(ffi::ThreadPool& pool, Rows r, const F& f) {
  const int64_t blocks = num_blocks(r);
  av::parallel_for(pool, blocks, [&](int64_t b) {
    f(b, r.n * b / blocks, r.n * (b + 1) / blocks);
  });
}

// sums[b] = per-channel sums of f(row) over the rows of block b; f adds into
// the two accumulators a and q (each C floats). The blocks' sums are then
// added in block order in double.
template <typename F>
void channel_sums(ffi::ThreadPool& pool, Rows r, const F& f, std::vector<double>& a_out,
                  std::vector<double>& q_out) {
  const int64_t blocks = num_blocks(r);
  std::vector<float> part(blocks * 2 * r.c, 0.f);
  for_row_blocks(pool, r, [&](int64_t b, int64_t lo, int64_t hi) {
    // Sums in a buffer of this call's own: neighbouring blocks' slots of
    // `part` share cache lines, which two threads would pass back and forth.
    std::vector<float> acc(2 * r.c, 0.f);
    float* a = acc.data();
    float* q = a + r.c;
    for (int64_t i = lo; i < hi; ++i) f(i, a, q);
    std::copy(acc.begin(), acc.end(), part.begin() + b * 2 * r.c);
  });
  a_out.assign(r.c, 0.0);
  q_out.assign(r.c, 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t k = 0; k < r.c; ++k) {
      a_out[k] += part[b * 2 * r.c + k];
      q_out[k] += part[b * 2 * r.c + r.c + k];
    }
}

template <bool kResidual>
ffi::Error Forward(ffi::ThreadPool pool, Array x, Array scale, Array bias, Array residual,
                   ArrayOut y, ArrayOut mean_out, ArrayOut var_out, float eps, bool relu) {
  const Rows r = rows_of(x);
  if (scale.element_count() != r.c || bias.element_count() != r.c ||
      y->element_count() != x.element_count() || mean_out->element_count() != r.c ||
      var_out->element_count() != r.c ||
      (kResidual && residual.element_count() != x.element_count()))
    return ffi::Error::InvalidArgument("av_batch_norm_forward: inconsistent shapes");
  const float* X = x.typed_data();
  const int64_t C = r.c;
  std::vector<double> s, ss;
  channel_sums(pool, r, [&](int64_t i, float* a, float* q) {
    const float* xi = X + i * C;
#pragma GCC ivdep
    for (int64_t k = 0; k < C; ++k) {
      a[k] += xi[k];
      q[k] += xi[k] * xi[k];
    }
  }, s, ss);
  std::vector<float> mul(C), add(C);
  float* M = mean_out->typed_data();
  float* V = var_out->typed_data();
  const float* S = scale.typed_data();
  const float* B = bias.typed_data();
  for (int64_t k = 0; k < C; ++k) {
    const double m = s[k] / r.n;
    M[k] = static_cast<float>(m);
    V[k] = static_cast<float>(std::max(0.0, ss[k] / r.n - m * m));
    const float inv = 1.f / std::sqrt(V[k] + eps);
    mul[k] = inv * S[k];
    add[k] = B[k] - M[k] * mul[k];
  }
  float* Y = y->typed_data();
  const float* R = kResidual ? residual.typed_data() : nullptr;
  for_row_blocks(pool, r, [&](int64_t, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* xi = X + i * C;
      float* yi = Y + i * C;
#pragma GCC ivdep
    for (int64_t k = 0; k < C; ++k) {
        float v = xi[k] * mul[k] + add[k];
        if constexpr (kResidual) v += R[i * C + k];
        yi[k] = relu ? std::max(v, 0.f) : v;
      }
    }
  });
  return ffi::Error::Success();
}

template <bool kResidual>
ffi::Error Backward(ffi::ThreadPool pool, Array x, Array y, Array dy, Array scale, Array mean,
                    Array var, Array dmean, Array dvar, ArrayOut dx, ArrayOut dscale_out,
                    ArrayOut dbias_out, ArrayOut dres, float eps, bool relu) {
  const Rows r = rows_of(x);
  const int64_t C = r.c;
  for (const Array* v : {&scale, &mean, &var, &dmean, &dvar})
    if (v->element_count() != C)
      return ffi::Error::InvalidArgument("av_batch_norm_backward: inconsistent shapes");
  if (y.element_count() != x.element_count() || dy.element_count() != x.element_count() ||
      dx->element_count() != x.element_count() || dscale_out->element_count() != C ||
      dbias_out->element_count() != C ||
      (kResidual && dres->element_count() != x.element_count()))
    return ffi::Error::InvalidArgument("av_batch_norm_backward: inconsistent shapes");
  const float *X = x.typed_data(), *Y = y.typed_data(), *DY = dy.typed_data();
  const float *M = mean.typed_data(), *V = var.typed_data(), *S = scale.typed_data();
  std::vector<float> inv(C);
  for (int64_t k = 0; k < C; ++k) inv[k] = 1.f / std::sqrt(V[k] + eps);
  // Pass 1: the two channel sums, and g itself (the residual's gradient; without
  // a residual, g goes into dx, which pass 2 then overwrites in place): pass 2
  // then reads two arrays, not three.
  float* DX = dx->typed_data();
  float* G = kResidual ? dres->typed_data() : DX;
  std::vector<double> db, ds;
  channel_sums(pool, r, [&](int64_t i, float* a, float* q) {
    const float *xi = X + i * C, *yi = Y + i * C, *di = DY + i * C;
#pragma GCC ivdep
    for (int64_t k = 0; k < C; ++k) {
      const float g = (relu && !(yi[k] > 0.f)) ? 0.f : di[k];
      G[i * C + k] = g;
      a[k] += g;
      q[k] += g * ((xi[k] - M[k]) * inv[k]);
    }
  }, db, ds);
  float* DS = dscale_out->typed_data();
  float* DB = dbias_out->typed_data();
  const float n = static_cast<float>(r.n);
  const float *DM = dmean.typed_data(), *DV = dvar.typed_data();
  // dx = k1 g - k2 - k3 (x - mean) with per-channel k1, k2, k3.
  std::vector<float> k1(C), k2(C), k3(C);
  for (int64_t k = 0; k < C; ++k) {
    DB[k] = static_cast<float>(db[k]);
    DS[k] = static_cast<float>(ds[k]);
    const float a = S[k] * inv[k] / n;
    const float dv = V[k] > 0.f ? DV[k] : 0.f;
    k1[k] = a * n;
    k2[k] = a * DB[k] - DM[k] / n;
    k3[k] = a * DS[k] * inv[k] - 2.f * dv / n;
  }
  for_row_blocks(pool, r, [&](int64_t, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float *xi = X + i * C, *gi = G + i * C;
      float* o = DX + i * C;
#pragma GCC ivdep
      for (int64_t k = 0; k < C; ++k) o[k] = k1[k] * gi[k] - k2[k] - k3[k] * (xi[k] - M[k]);
    }
  });
  return ffi::Error::Success();
}

// Without a residual the kernels take one operand (and return one result) fewer.
ffi::Error ForwardPlain(ffi::ThreadPool pool, Array x, Array scale, Array bias, ArrayOut y,
                        ArrayOut mean, ArrayOut var, float eps, bool relu) {
  return Forward<false>(pool, x, scale, bias, x, y, mean, var, eps, relu);
}

ffi::Error BackwardPlain(ffi::ThreadPool pool, Array x, Array y, Array dy, Array scale,
                         Array mean, Array var, Array dmean, Array dvar, ArrayOut dx,
                         ArrayOut dscale, ArrayOut dbias, float eps, bool relu) {
  return Backward<false>(pool, x, y, dy, scale, mean, var, dmean, dvar, dx, dscale, dbias, dx,
                         eps, relu);
}

}  // namespace

// The bindings, built from their shared parts.
// Forward: x, scale, bias [, residual] -> y, mean, var.
// Backward: x, y, dy, scale, mean, var, dmean, dvar -> dx, dscale, dbias [, d residual].
static auto ThreeInputs() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Array>().Arg<Array>().Arg<Array>();
}
static auto BackwardInputs() {
  return ThreeInputs().Arg<Array>().Arg<Array>().Arg<Array>().Arg<Array>().Arg<Array>();
}
template <typename B>
static auto ThreeResultsAndAttrs(B b) {
  return std::move(b).template Ret<Array>().template Ret<Array>().template Ret<Array>()
      .template Attr<float>("eps").template Attr<bool>("relu");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(av_batch_norm_forward, ForwardPlain,
                              ThreeResultsAndAttrs(ThreeInputs()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(av_batch_norm_add_forward, Forward<true>,
                              ThreeResultsAndAttrs(ThreeInputs().Arg<Array>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(av_batch_norm_backward, BackwardPlain,
                              ThreeResultsAndAttrs(BackwardInputs()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(av_batch_norm_add_backward, Backward<true>,
                              ThreeResultsAndAttrs(BackwardInputs().Ret<Array>()));
