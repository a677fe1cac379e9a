// One early exit's decision inside the single-dispatch cascade, as one kernel
// (adaptive_vision/cpu/native/decide.py registers it; build.py compiles it).
//
// Why: XLA:CPU computes the softmax entropy of a [1, K] row, compares it and
// updates the cascade's state in five small fusions (max, log-sum-exp,
// weighted sum, select, the predicate of the next conditional): about 3 us per
// exit at batch 1 on a Zen 5, most of it the cost of running an operation,
// not arithmetic (results/bench_notes.md). Here one pass per row does it all.
//
// state is [B, K + 1]: the logits of the exit taken and its index (-1 while
// undecided). For each undecided row, the exit fires when its criterion
// passes (criterion 0: softmax entropy < threshold; 1: largest softmax
// probability > threshold) or when it is the last exit (`last`); a row that
// fires takes these logits and the index `exit`. `undecided` is 1 when some
// row is still undecided afterwards (the predicate of the next segment).
#include <cmath>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Matrix = ffi::Buffer<ffi::F32, 2>;  // named: the FFI macros split on commas
using MatrixOut = ffi::ResultBuffer<ffi::F32, 2>;
using Scalar = ffi::Buffer<ffi::F32, 1>;
using FlagBuffer = ffi::Buffer<ffi::PRED, 0>;
using Flag = ffi::ResultBuffer<ffi::PRED, 0>;

static ffi::Error Decide(Matrix logits, Matrix state, Scalar threshold, MatrixOut out,
                         Flag undecided, int64_t exit, bool last, int64_t criterion) {
  const int64_t B = logits.dimensions()[0], K = logits.dimensions()[1];
  if (state.dimensions()[0] != B || state.dimensions()[1] != K + 1 ||
      out->dimensions()[0] != B || out->dimensions()[1] != K + 1 ||
      threshold.dimensions()[0] < 1 || criterion < 0 || criterion > 1)
    return ffi::Error::InvalidArgument("av_exit_decide: inconsistent shapes or criterion");
  const float* L = logits.typed_data();
  const float* S = state.typed_data();
  float* O = out->typed_data();
  const float t = threshold.typed_data()[0];
  bool any = false;
  for (int64_t b = 0; b < B; ++b) {
    const float* l = L + b * K;
    const float* s = S + b * (K + 1);
    float* o = O + b * (K + 1);
    bool fires = s[K] < 0.f;
    if (fires && !last) {
      float m = l[0];
      for (int64_t k = 1; k < K; ++k) m = std::fmax(m, l[k]);
      float z = 0.f, weighted = 0.f;  // sum e^(l - m), sum e^(l - m) (l - m)
      for (int64_t k = 0; k < K; ++k) {
        const float e = std::exp(l[k] - m);
        z += e;
        weighted += e * (l[k] - m);
      }
      // entropy = log z - weighted / z; the largest probability = 1 / z
      fires = criterion == 0 ? std::log(z) - weighted / z < t : 1.f / z > t;
    }
    if (fires) {
      for (int64_t k = 0; k < K; ++k) o[k] = l[k];
      o[K] = static_cast<float>(exit);
    } else {
      for (int64_t k = 0; k <= K; ++k) o[k] = s[k];
    }
    any |= o[K] < 0.f;
  }
  *undecided->typed_data() = any;
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(av_exit_decide, Decide,
                              ffi::Ffi::Bind()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Arg<Scalar>()
                                  .Ret<Matrix>()
                                  .Ret<FlagBuffer>()
                                  .Attr<int64_t>("exit")
                                  .Attr<bool>("last")
                                  .Attr<int64_t>("criterion"));
