// The work-sharing loop the native kernels run on XLA's CPU thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace av {

// Runs f(i) for i in [0, n) on the calling thread and the pool's threads.
// The caller works through the items itself, so it only ever waits for items
// that another thread is already running (no deadlock when the pool is busy).
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct State { std::atomic<int64_t> next{0}, done{0}; };
  auto state = std::make_shared<State>();
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  // A helper that starts after every item is claimed returns without calling f.
  auto drain = [state, n, fp = &f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*fp)(i);
      state->done.fetch_add(1);
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([drain]() { drain(); });
  drain();
  while (state->done.load() < n) std::this_thread::yield();
}

}  // namespace av
