// The early-exit head at inference as one kernel: BatchNorm (running averages,
// folded into a per-channel scale and shift), ReLU, average pooling and the
// dense layer (adaptive_vision/cpu/native/head.py registers it; build.py compiles it).
//
// Why: at batch 1 the ERDE exit head on a 32x32x16 map cost 35-70 us through
// XLA:CPU (a reduce_window loop and a 4096 x 10 matrix product it runs as a
// plain loop) for 41k multiply-adds; every early exit pays it, the whole
// network never does, so it ate the exits' saving (results/bench_notes.md).
// Here each image is pooled into a per-thread buffer (vectorized over
// channels, with the common channel counts as compile-time constants) and the
// logits are K dot products with the rows of the transposed kernel, eight per
// pass over the pooled values. One kernel that reads the block's output
// directly also keeps the program a chain of operations: XLA:CPU runs a
// program whose operations branch (a separate normalization fusion beside the
// next block) concurrently, handing work between threads, which at batch 1
// costs more than the head.
//
//   y[b, k] = bias[k] + sum_i pooled[b, i] * wt[k, i]
//   pooled[b, (ph * Wq + pw) * C + c] = mean over the wh x ww window at (ph, pw)
//                                       of max(0, x[b, ., ., c] * scale[c] + shift[c])
//
// Windows do not overlap and start at 0 (stride = window, no padding); rows
// and columns past the last whole window are dropped, as 'VALID' pooling does.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"

static constexpr int kWidth = 16;  // floats per accumulator (GCC splits it where needed)
typedef float vf __attribute__((vector_size(kWidth * 4)));
typedef float vf_any __attribute__((vector_size(kWidth * 4), aligned(4), may_alias));

static inline vf load(const float* p) { return *reinterpret_cast<const vf_any*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vf_any*>(p) = v; }

// y[k] = bias[k] + scale * (a . w[k]) for N consecutive rows k of w (each n
// floats): one pass over a, N independent accumulator chains (one chain per
// dot would wait on the FMA latency).
template <int N>
static void dots(const float* a, const float* w, const float* bias, float scale, int64_t n,
                 float* y) {
  vf acc[N];
  for (int k = 0; k < N; ++k) acc[k] = vf{};
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    const vf av = load(a + i);
    for (int k = 0; k < N; ++k) acc[k] += av * load(w + k * n + i);
  }
  for (int k = 0; k < N; ++k) {
    float s = 0.f;
    for (int l = 0; l < kWidth; ++l) s += acc[k][l];
    for (int64_t t = i; t < n; ++t) s += a[t] * w[k * n + t];
    y[k] = bias[k] + scale * s;
  }
}

template <int N>
static void dots_of(int n_rows, const float* a, const float* w, const float* bias, float scale,
                    int64_t n, float* y) {
  if constexpr (N > 1) {
    if (n_rows < N) return dots_of<N - 1>(n_rows, a, w, bias, scale, n, y);
  }
  dots<N>(a, w, bias, scale, n, y);
}

static constexpr int kRows = 8;  // dot products per pass

// pooled[p * C + c] for the Hq x Wq windows of one image, each the window's
// SUM (the mean's 1 / (wh * ww) is applied to the logits). NC > 0: C = NC *
// kWidth channels, a compile-time count, so the channel loop is NC vector
// operations with no loop of its own; the runtime-length loops of the
// generic version (NC = 0) cost more than the arithmetic at batch 1 (5.6 us
// against 2 us for the ERDE student's first head on a Zen 5).
template <int NC>
static void pool_image(const float* xb, const float* A, const float* S, float* pooled,
                       int64_t Hq, int64_t Wq, int64_t W, int64_t C, int64_t wh, int64_t ww) {
  if constexpr (NC > 0) {
    vf a[NC], s[NC];
    for (int v = 0; v < NC; ++v) a[v] = load(A + v * kWidth), s[v] = load(S + v * kWidth);
    const vf zero{};
    for (int64_t ph = 0; ph < Hq; ++ph)
      for (int64_t pw = 0; pw < Wq; ++pw) {
        vf acc[NC];
        for (int v = 0; v < NC; ++v) acc[v] = zero;
        for (int64_t i = 0; i < wh; ++i) {
          const float* row = xb + ((ph * wh + i) * W + pw * ww) * C;
          for (int64_t j = 0; j < ww; ++j)
            for (int v = 0; v < NC; ++v) {
              vf t = load(row + j * C + v * kWidth) * a[v] + s[v];
              acc[v] += t > zero ? t : zero;
            }
        }
        float* out = pooled + (ph * Wq + pw) * C;
        for (int v = 0; v < NC; ++v) store(out + v * kWidth, acc[v]);
      }
  } else {
    for (int64_t ph = 0; ph < Hq; ++ph)
      for (int64_t pw = 0; pw < Wq; ++pw) {
        float* out = pooled + (ph * Wq + pw) * C;
        std::fill(out, out + C, 0.f);
        for (int64_t i = 0; i < wh; ++i)
          for (int64_t j = 0; j < ww; ++j) {
            const float* in = xb + ((ph * wh + i) * W + pw * ww + j) * C;
            for (int64_t c = 0; c < C; ++c) out[c] += std::max(0.f, in[c] * A[c] + S[c]);
          }
      }
  }
}

// Named: the FFI macros split on commas.
using Maps = ffi::Buffer<ffi::F32, 4>;
using Matrix = ffi::Buffer<ffi::F32, 2>;
using Vector = ffi::Buffer<ffi::F32, 1>;
using MatrixOut = ffi::ResultBuffer<ffi::F32, 2>;

static ffi::Error ExitHead(ffi::ThreadPool pool, Maps x, Vector scale, Vector shift, Matrix wt,
                            Vector bias, MatrixOut y, int64_t wh, int64_t ww) {
  auto xd = x.dimensions();
  const int64_t B = xd[0], H = xd[1], W = xd[2], C = xd[3];
  const int64_t K = wt.dimensions()[0], P = wt.dimensions()[1];
  if (wh < 1 || ww < 1 || (H / wh) * (W / ww) * C != P || bias.dimensions()[0] != K ||
      scale.dimensions()[0] != C || shift.dimensions()[0] != C ||
      y->dimensions()[0] != B || y->dimensions()[1] != K)
    return ffi::Error::InvalidArgument("av_exit_head: inconsistent shapes");
  const int64_t Hq = H / wh, Wq = W / ww;
  const float inv = 1.f / static_cast<float>(wh * ww);
  const float* X = x.typed_data();
  const float* A = scale.typed_data();
  const float* S = shift.typed_data();
  const float* WT = wt.typed_data();
  const float* BIAS = bias.typed_data();
  float* Y = y->typed_data();
  auto pool_fn = C == kWidth ? pool_image<1> : C == 2 * kWidth ? pool_image<2>
               : C == 4 * kWidth ? pool_image<4> : pool_image<0>;
  av::parallel_for(pool, B, [&](int64_t b) {
    static thread_local std::vector<float> pooled;
    if (static_cast<int64_t>(pooled.size()) < P) pooled.resize(P);
    pool_fn(X + b * H * W * C, A, S, pooled.data(), Hq, Wq, W, C, wh, ww);
    for (int64_t k = 0; k < K; k += kRows)
      dots_of<kRows>(static_cast<int>(std::min<int64_t>(kRows, K - k)), pooled.data(),
                     WT + k * P, BIAS + k, inv, P, Y + b * K + k);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(av_exit_head, ExitHead,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Maps>()
                                  .Arg<Vector>()
                                  .Arg<Vector>()
                                  .Arg<Matrix>()
                                  .Arg<Vector>()
                                  .Ret<Matrix>()
                                  .Attr<int64_t>("wh")
                                  .Attr<int64_t>("ww"));
