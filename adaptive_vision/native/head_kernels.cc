// The early-exit head at inference as one kernel: BatchNorm (running averages,
// folded into a per-channel scale and shift), ReLU, average pooling and the
// dense layer (adaptive_vision/native/head.py registers it; build.py compiles it).
//
// Why: at batch 1 the ERDE exit head on a 32x32x16 map cost 35-70 us through
// XLA:CPU (a reduce_window loop and a 4096 x 10 matrix product it runs as a
// plain loop) for 41k multiply-adds; every early exit pays it, the whole
// network never does, so it ate the exits' saving (results/bench_notes.md).
// Here each image is pooled into a per-thread buffer (vectorized over
// channels) and the logits are K dot products with the rows of the transposed
// kernel. One kernel that reads the block's output directly also keeps the
// program a chain of operations: XLA:CPU runs a program whose operations
// branch (a separate normalization fusion beside the next block) concurrently,
// handing work between threads, which at batch 1 costs more than the head.
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

static float dot(const float* a, const float* b, int64_t n) {
  vf acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    acc0 += load(a + i) * load(b + i);
    acc1 += load(a + i + kWidth) * load(b + i + kWidth);
  }
  for (; i + kWidth <= n; i += kWidth) acc0 += load(a + i) * load(b + i);
  acc0 += acc1;
  float s = 0.f;
  for (int l = 0; l < kWidth; ++l) s += acc0[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
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
  av::parallel_for(pool, B, [&](int64_t b) {
    static thread_local std::vector<float> pooled;
    if (static_cast<int64_t>(pooled.size()) < P) pooled.resize(P);
    const float* xb = X + b * H * W * C;
    for (int64_t ph = 0; ph < Hq; ++ph)
      for (int64_t pw = 0; pw < Wq; ++pw) {
        float* out = pooled.data() + (ph * Wq + pw) * C;
        std::fill(out, out + C, 0.f);
        for (int64_t i = 0; i < wh; ++i)
          for (int64_t j = 0; j < ww; ++j) {
            const float* in = xb + ((ph * wh + i) * W + pw * ww + j) * C;
            for (int64_t c = 0; c < C; ++c) out[c] += std::max(0.f, in[c] * A[c] + S[c]);
          }
        for (int64_t c = 0; c < C; ++c) out[c] *= inv;
      }
    for (int64_t k = 0; k < K; ++k) Y[b * K + k] = BIAS[k] + dot(pooled.data(), WT + k * P, P);
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
