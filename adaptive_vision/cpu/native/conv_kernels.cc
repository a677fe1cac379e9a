// Direct NHWC convolution kernels for XLA:CPU, called through XLA's FFI
// (adaptive_vision/cpu/native/conv.py registers them; build.py compiles this file
// for the machine it runs on).
//
// Why: XLA:CPU's own convolutions and the im2col + GEMM gradients run the
// CIFAR ResNets' narrow convolutions (16-64 channels) at about half of what
// direct kernels reach (1.6-2.4x faster forward on a Zen 3, results/
// bench_notes.md). Here every block of 16 output channels is held in one
// AVX-512 or two AVX2 registers; each input value is broadcast once per tap
// and multiplied into a register tile of output pixels (forward, input
// gradient) or of input channels (weight gradient).
//
// Padding is done here, one image row window (forward) or one image (weight
// and input gradients) at a time in a per-thread buffer that stays in cache,
// instead of as a padded copy of the whole batch. Output channels (and, for
// the input gradient, input channels) are a multiple of 16: the caller checks
// and otherwise uses another implementation.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "parallel.h"

using Images = ffi::Buffer<ffi::F32, 4>;  // named: the FFI macros split on commas
using ImagesOut = ffi::ResultBuffer<ffi::F32, 4>;

// A block of kLanes = 16 channels is kParts native vectors of kWidth floats:
// one AVX-512 register, or two AVX2 ones (wider GCC vectors on AVX2 spill).
static constexpr int kLanes = 16;
#if defined(__AVX512F__)
#define AV_WIDTH 16
static constexpr int kPixels = 12;    // forward: output pixels per register tile
static constexpr int kChannels = 16;  // weight gradient: input channels per tile
#else  // 16 registers: a tile of 6 x 2 accumulators leaves room for the operands
#define AV_WIDTH 8
static constexpr int kPixels = 6;
static constexpr int kChannels = 6;
#endif
static constexpr int kWidth = AV_WIDTH;
static constexpr int kParts = kLanes / kWidth;
typedef float vf __attribute__((vector_size(AV_WIDTH * 4)));
// The same vector at any float address (unaligned loads and stores).
typedef float vf_any __attribute__((vector_size(AV_WIDTH * 4), aligned(4), may_alias));

static inline vf load(const float* p) { return *reinterpret_cast<const vf_any*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vf_any*>(p) = v; }

// acc[t][k] for t < N, k < kParts: a tile of N rows of kLanes floats.
template <int N>
struct Tile {
  vf v[N][kParts];
  Tile() { for (int t = 0; t < N; ++t) for (int k = 0; k < kParts; ++k) v[t][k] = vf{}; }
  // Row t += a * (the kLanes floats at w).
  inline void fma(int t, float a, const vf* w) {
    for (int k = 0; k < kParts; ++k) v[t][k] += a * w[k];
  }
  inline void load_lanes(const float* p, vf* w) const {
    for (int k = 0; k < kParts; ++k) w[k] = load(p + k * kWidth);
  }
  inline void store_row(int t, float* p) const {
    for (int k = 0; k < kParts; ++k) store(p + k * kWidth, v[t][k]);
  }
  inline void add_row(int t, float* p) const {
    for (int k = 0; k < kParts; ++k) store(p + k * kWidth, load(p + k * kWidth) + v[t][k]);
  }
};

// A per-thread buffer (XLA's pool threads live as long as the process).
static float* scratch(int slot, int64_t n) {
  static thread_local std::vector<float> buffers[2];
  if (static_cast<int64_t>(buffers[slot].size()) < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

// Copies rows [r0, r0 + rows) of the padded image (row r is image row r - top,
// column c is image column c - left; outside the image: zeros) into dst, of
// width Wp. `img` is one H x W x C image.
static void padded_rows(const float* img, int64_t H, int64_t W, int64_t C, int64_t top,
                        int64_t left, int64_t r0, int64_t rows, int64_t Wp, float* dst) {
  const int64_t c_end = std::min<int64_t>(Wp, left + W);
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * Wp * C;
    const int64_t ih = r0 + r - top;
    if (ih < 0 || ih >= H) {
      std::fill(d, d + Wp * C, 0.f);
      continue;
    }
    const int64_t c_begin = std::max<int64_t>(0, left);
    std::fill(d, d + c_begin * C, 0.f);
    if (c_end > c_begin)
      std::memcpy(d + c_begin * C, img + (ih * W + (c_begin - left)) * C,
                  (c_end - c_begin) * C * sizeof(float));
    std::fill(d + std::max(c_end, c_begin) * C, d + Wp * C, 0.f);
  }
}

// Forward: y[b, oh, ow, co] = sum_{i, j, c} x[b, oh*sh + i, ow*sw + j, c] w[i, j, c, co].
// PS: the distance between neighbouring output pixels' inputs (sw * Ci) when
// it is one of the common ones, else 0 (read at run time). As a constant it
// turns the N broadcast addresses into fixed offsets from one pointer, which
// frees the registers the loop needs.
template <int N, int PS>
static inline void forward_tile(const float* x, const float* w, float* y, int64_t Wp, int64_t Ci,
                                int64_t Co, int64_t KH, int64_t KW, int64_t sw, int64_t ow0,
                                int64_t co0) {
  const int64_t ps = PS ? PS : sw * Ci;
  Tile<N> acc;
  for (int64_t i = 0; i < KH; ++i) {
    for (int64_t j = 0; j < KW; ++j) {
      const float* wp = w + (i * KW + j) * Ci * Co + co0;
      const float* xp = x + i * Wp * Ci + ow0 * ps + j * Ci;
      for (int64_t c = 0; c < Ci; ++c) {
        vf wv[kParts];
        acc.load_lanes(wp + c * Co, wv);
        for (int t = 0; t < N; ++t) acc.fma(t, xp[t * ps + c], wv);
      }
    }
  }
  for (int t = 0; t < N; ++t) acc.store_row(t, y + (ow0 + t) * Co + co0);
}

template <int N, int PS>
static void forward_tile_of(int n, const float* x, const float* w, float* y, int64_t Wp,
                            int64_t Ci, int64_t Co, int64_t KH, int64_t KW, int64_t sw,
                            int64_t ow0, int64_t co0) {
  if constexpr (N > 1) {
    if (n < N) return forward_tile_of<N - 1, PS>(n, x, w, y, Wp, Ci, Co, KH, KW, sw, ow0, co0);
  }
  forward_tile<N, PS>(x, w, y, Wp, Ci, Co, KH, KW, sw, ow0, co0);
}

// Calls f(std::integral_constant<int, S>) with S = stride if it is a common
// pixel stride (in floats), else S = 0.
template <typename F>
static void with_stride(int64_t stride, const F& f) {
  switch (stride) {
    case 16: return f(std::integral_constant<int, 16>());
    case 32: return f(std::integral_constant<int, 32>());
    case 64: return f(std::integral_constant<int, 64>());
    case 128: return f(std::integral_constant<int, 128>());
    default: return f(std::integral_constant<int, 0>());
  }
}

static ffi::Error Forward(ffi::ThreadPool pool, Images x, Images w, ImagesOut y, int64_t sh,
                          int64_t sw, int64_t top, int64_t left) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const int64_t H = xd[1], W = xd[2], Ci = xd[3];
  const int64_t KH = wd[0], KW = wd[1], Co = wd[3];
  const int64_t B = yd[0], Ho = yd[1], Wo = yd[2];
  if (Co % kLanes || wd[2] != Ci || yd[3] != Co || xd[0] != B || top < 0 || left < 0)
    return ffi::Error::InvalidArgument("av_conv_forward: inconsistent shapes");
  const int64_t Wp = (Wo - 1) * sw + KW;  // the padded columns the outputs read
  const float* X = x.typed_data();
  const float* Wt = w.typed_data();
  float* Y = y->typed_data();
  av::parallel_for(pool, B * Ho, [&](int64_t r) {
    const int64_t b = r / Ho, oh = r % Ho;
    float* window = scratch(0, KH * Wp * Ci);
    padded_rows(X + b * H * W * Ci, H, W, Ci, top, left, oh * sh, KH, Wp, window);
    float* yr = Y + ((b * Ho + oh) * Wo) * Co;
    // Equal tiles of at most kPixels: a short remainder tile would leave the
    // FMA units waiting on too few independent accumulators.
    const int64_t tiles = (Wo + kPixels - 1) / kPixels;
    with_stride(sw * Ci, [&](auto ps) {
      for (int64_t co0 = 0; co0 < Co; co0 += kLanes) {
        int64_t ow0 = 0;
        for (int64_t t = 0; t < tiles; ++t) {
          int n = static_cast<int>((Wo - ow0) / (tiles - t));
          forward_tile_of<kPixels, decltype(ps)::value>(n, window, Wt, yr, Wp, Ci, Co, KH, KW,
                                                        sw, ow0, co0);
          ow0 += n;
        }
      }
    });
  });
  return ffi::Error::Success();
}

// Weight gradient: dw[i, j, c, co] = sum_{b, oh, ow} x[b, oh*sh + i, ow*sw + j, c] dy[b, oh, ow, co].
// One image's contribution to a tile of N input channels x 16 output channels,
// added into `out`.
template <int N>
static inline void weight_grad_tile(float* out, const float* xb, const float* dyb, int64_t Wp,
                                    int64_t Ci, int64_t Co, int64_t Ho, int64_t Wo, int64_t sh,
                                    int64_t sw, int64_t i, int64_t j, int64_t c0, int64_t co0) {
  Tile<N> acc;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const float* xr = xb + ((oh * sh + i) * Wp + j) * Ci + c0;
    const float* dr = dyb + oh * Wo * Co + co0;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      vf d[kParts];
      acc.load_lanes(dr + ow * Co, d);
      const float* xp = xr + ow * sw * Ci;
      for (int c = 0; c < N; ++c) acc.fma(c, xp[c], d);
    }
  }
  for (int c = 0; c < N; ++c) acc.add_row(c, out + c * Co);
}

static ffi::Error WeightGrad(ffi::ThreadPool pool, Images x, Images dy, ImagesOut dw,
                             int64_t sh, int64_t sw, int64_t top, int64_t left) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  const int64_t B = xd[0], H = xd[1], W = xd[2], Ci = xd[3];
  const int64_t Ho = yd[1], Wo = yd[2], Co = yd[3];
  const int64_t KH = wd[0], KW = wd[1];
  if (Co % kLanes || yd[0] != B || wd[2] != Ci || wd[3] != Co || top < 0 || left < 0)
    return ffi::Error::InvalidArgument("av_conv_weight_grad: inconsistent shapes");
  const int64_t Hp = (Ho - 1) * sh + KH, Wp = (Wo - 1) * sw + KW;
  const float* X = x.typed_data();
  const float* DY = dy.typed_data();
  const int64_t K = KH * KW * Ci * Co;
  // Each part sums a fixed set of images (b = p, p + parts, ...) into its own
  // copy; the copies are added in a fixed order: the result does not depend
  // on which thread ran which part.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), B));
  std::vector<float> partial(parts * K, 0.f);
  av::parallel_for(pool, parts, [&](int64_t p) {
    float* acc = partial.data() + p * K;
    float* xb = scratch(0, Hp * Wp * Ci);
    for (int64_t b = p; b < B; b += parts) {
      padded_rows(X + b * H * W * Ci, H, W, Ci, top, left, 0, Hp, Wp, xb);
      const float* dyb = DY + b * Ho * Wo * Co;
      for (int64_t i = 0; i < KH; ++i)
        for (int64_t j = 0; j < KW; ++j)
          for (int64_t c0 = 0; c0 < Ci; c0 += kChannels)
            for (int64_t co0 = 0; co0 < Co; co0 += kLanes) {
              float* out = acc + ((i * KW + j) * Ci + c0) * Co + co0;
              if (Ci - c0 >= kChannels) {
                weight_grad_tile<kChannels>(out, xb, dyb, Wp, Ci, Co, Ho, Wo, sh, sw, i, j, c0, co0);
              } else {
                for (int64_t c = c0; c < Ci; ++c)
                  weight_grad_tile<1>(out + (c - c0) * Co, xb, dyb, Wp, Ci, Co, Ho, Wo, sh, sw,
                                      i, j, c, co0);
              }
            }
    }
  });
  float* DW = dw->typed_data();
  for (int64_t k = 0; k < K; ++k) {
    float s = 0.f;
    for (int64_t p = 0; p < parts; ++p) s += partial[p * K + k];
    DW[k] = s;
  }
  return ffi::Error::Success();
}

// Input gradient, any stride (the transposed convolution), onto the padded
// input grid: dx[b, oh*sh + i, ow*sw + j, c] += sum_co dy[b, oh, ow, co] wt[i, j, co, c],
// where wt is w with its last two axes swapped (input channels contiguous).
// One image per work item, so the scattered additions never race.
template <int N, int PS>  // PS: Co when common (see forward_tile), else 0
static inline void input_grad_tile(const float* dyr, const float* wt, float* dxr, int64_t Wp,
                                   int64_t Ci, int64_t Co, int64_t sw, int64_t j, int64_t ow0,
                                   int64_t c0) {
  const int64_t ps = PS ? PS : Co;
  Tile<N> acc;
  const float* d = dyr + ow0 * ps;
  for (int64_t co = 0; co < Co; ++co) {
    vf wv[kParts];
    acc.load_lanes(wt + co * Ci + c0, wv);
    for (int t = 0; t < N; ++t) acc.fma(t, d[t * ps + co], wv);
  }
  for (int t = 0; t < N; ++t) acc.add_row(t, dxr + ((ow0 + t) * sw + j) * Ci + c0);
}

template <int N, int PS>
static void input_grad_tile_of(int n, const float* dyr, const float* wt, float* dxr, int64_t Wp,
                               int64_t Ci, int64_t Co, int64_t sw, int64_t j, int64_t ow0,
                               int64_t c0) {
  if constexpr (N > 1) {
    if (n < N) return input_grad_tile_of<N - 1, PS>(n, dyr, wt, dxr, Wp, Ci, Co, sw, j, ow0, c0);
  }
  input_grad_tile<N, PS>(dyr, wt, dxr, Wp, Ci, Co, sw, j, ow0, c0);
}

static ffi::Error InputGrad(ffi::ThreadPool pool, Images dy, Images wt, ImagesOut dx,
                            int64_t sh, int64_t sw, int64_t top, int64_t left) {
  auto yd = dy.dimensions(), wd = wt.dimensions(), xd = dx->dimensions();
  const int64_t B = yd[0], Ho = yd[1], Wo = yd[2], Co = yd[3];
  const int64_t KH = wd[0], KW = wd[1];
  const int64_t H = xd[1], W = xd[2], Ci = xd[3];
  if (Ci % kLanes || xd[0] != B || wd[2] != Co || wd[3] != Ci || top < 0 || left < 0)
    return ffi::Error::InvalidArgument("av_conv_input_grad: inconsistent shapes");
  // The padded grid the outputs were read from; rows and columns past the
  // image (padding) are dropped when the image's part is copied out.
  const int64_t Hp = (Ho - 1) * sh + KH, Wp = (Wo - 1) * sw + KW;
  const float* DY = dy.typed_data();
  const float* WT = wt.typed_data();
  float* DX = dx->typed_data();
  av::parallel_for(pool, B, [&](int64_t b) {
    float* grid = scratch(0, Hp * Wp * Ci);
    std::fill(grid, grid + Hp * Wp * Ci, 0.f);
    const int64_t tiles = (Wo + kPixels - 1) / kPixels;
    with_stride(Co, [&](auto ps) {
    for (int64_t oh = 0; oh < Ho; ++oh) {
      const float* dyr = DY + (b * Ho + oh) * Wo * Co;
      for (int64_t i = 0; i < KH; ++i) {
        float* gr = grid + (oh * sh + i) * Wp * Ci;
        for (int64_t j = 0; j < KW; ++j) {
          const float* w = WT + (i * KW + j) * Co * Ci;
          for (int64_t c0 = 0; c0 < Ci; c0 += kLanes) {
            int64_t ow0 = 0;
            for (int64_t t = 0; t < tiles; ++t) {
              int n = static_cast<int>((Wo - ow0) / (tiles - t));
              input_grad_tile_of<kPixels, decltype(ps)::value>(n, dyr, w, gr, Wp, Ci, Co, sw,
                                                                j, ow0, c0);
              ow0 += n;
            }
          }
        }
      }
    }
    });
    float* dxb = DX + b * H * W * Ci;
    for (int64_t ih = 0; ih < H; ++ih) {
      float* d = dxb + ih * W * Ci;
      const int64_t r = ih + top;
      // Image pixels no output read (past the padded grid) get zero gradient.
      int64_t c_begin = left, c_end = std::min<int64_t>(Wp, left + W);
      if (r >= Hp || c_end <= c_begin) {
        std::fill(d, d + W * Ci, 0.f);
        continue;
      }
      std::memcpy(d, grid + (r * Wp + c_begin) * Ci, (c_end - c_begin) * Ci * sizeof(float));
      std::fill(d + (c_end - c_begin) * Ci, d + W * Ci, 0.f);
    }
  });
  return ffi::Error::Success();
}

// All three take two 4-D float32 arrays, return one, and read the strides
// and the top/left padding (the output shape implies the rest).
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Images>()
      .Arg<Images>()
      .Ret<Images>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("top")
      .Attr<int64_t>("left");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(av_conv_forward, Forward, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(av_conv_weight_grad, WeightGrad, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(av_conv_input_grad, InputGrad, ConvBinding());
