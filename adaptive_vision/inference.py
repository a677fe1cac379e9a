"""Dynamic early-exit inference that really skips work (RAViT cascades).

`DynamicCascade` runs branch 0 on the whole batch, decides on device which
examples exit (the criterion and strict comparisons of
`adaptive_vision.early_exit.exit_policy`), brings back only that boolean
decision, and runs branch 1 on the examples that did not exit, and so on; the
last branch answers for everyone still there. A branch nobody reaches is not
run at all.

Static shapes. The number of remaining examples is padded up to a *bucket*
size, so `jax.jit` compiles at most one program per (branch, bucket) for a
given batch size N and view placement -- never one per distinct count.
Default buckets: powers of two from `min_bucket` (8) up to N, plus N itself,
e.g. N=100 -> (8, 16, 32, 64, 100). `buckets` may instead list sizes (ints,
N is always added as the largest) or fractions of N (floats in (0, 1], rounded
up). Branch 0 always runs on exactly N examples, so for E branches at most
`1 + (E - 1) * len(buckets)` programs are compiled (`program_bound(N)`);
`num_compiled` counts the traces actually made.

Data movement per branch k > 0: the padded index vector of the remaining
examples goes to the device (plus, for numpy views, only the remaining rows of
view k, gathered on the host; jax views are gathered on device) and one
boolean vector of exit decisions comes back. What branch k+1 reuses from
branch k (class token / logits) stays on device in an [N, ...] buffer, and
the logits of the exit taken are scattered into an [N, K] device buffer that
is fetched once at the end.

`SingleDispatchCascade` is the other executor, for images that come one at a
time (real-time and edge use) or in small batches: the whole early-exit
decision is one jitted program (`cascade_program`), each later segment under
`jax.lax.cond`, so a call is one dispatch and no host round-trip, and XLA
runs a segment only when some example of the batch is still undecided (at
batch 1: exactly the segments the image needs). It works for every family
with `num_exits` and `segment(k, inputs, carry)` (RAViT, the `vit` family,
the ERDE ResNets). At larger batches a segment runs on the whole batch as
soon as one example needs it, which is where `DynamicCascade`'s bucketing
wins.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision import backend as backend_lib
from adaptive_vision import early_exit


def default_buckets(n: int, min_bucket: int = 8) -> tuple[int, ...]:
  """Powers of two from `min_bucket` up to (excluding) n, then n."""
  if n <= 0:
    return ()
  sizes, b = [], max(1, int(min_bucket))
  b = 1 << (b - 1).bit_length()  # round min_bucket up to a power of two
  while b < n:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (n,)


def resolve_buckets(n: int, buckets: Optional[Sequence[Any]] = None,
                    min_bucket: int = 8) -> tuple[int, ...]:
  """Sorted bucket sizes for a batch of n; n is always the largest."""
  if n <= 0:
    return ()
  if buckets is None:
    return default_buckets(n, min_bucket)
  sizes = set()
  for b in buckets:
    if isinstance(b, (float, np.floating)):
      if not 0.0 < b <= 1.0:
        raise ValueError(f"bucket fraction {b} must lie in (0, 1]; give sizes as ints")
      sizes.add(max(1, math.ceil(b * n)))
    else:
      if int(b) != b or int(b) <= 0:
        raise ValueError(f"bucket sizes must be positive ints, got {b!r}")
      sizes.add(int(b))
  return tuple(sorted(s for s in sizes if s < n)) + (n,)


def _check_thresholds(thresholds: Any, num_exits: int) -> np.ndarray:
  t = np.asarray(thresholds if thresholds is not None else [], dtype=np.float32).reshape(-1)
  if t.shape[0] != num_exits - 1:
    raise ValueError(f"got {t.shape[0]} thresholds for {num_exits} exits; give one "
                     f"per non-final exit ({num_exits - 1})")
  return t


class _Thresholds:
  """The per-exit thresholds of an executor, checked against its `num_exits`
  whenever they are set; `_thresholds_changed` lets an executor react."""

  @property
  def thresholds(self) -> np.ndarray:
    return self._thresholds

  @thresholds.setter
  def thresholds(self, value) -> None:
    self._thresholds = _check_thresholds(value, self.num_exits)
    self._thresholds_changed()

  def _thresholds_changed(self) -> None:
    pass


class DynamicCascade(_Thresholds):
  """Batched dynamic executor for a RAViT (any module with `branch(k, view, prev)`).

  Args:
    model: a `RAViT` (needs `num_exits`, `resolutions` and `branch`).
    variables: its variables (`{'params': ...}`).
    thresholds: one per non-final exit (length E - 1), as in
      `early_exit.exit_policy`; changing them later (`cascade.thresholds = ...`)
      does not recompile.
    criterion: 'entropy' (exit when entropy < threshold) or 'max_prob'
      (exit when max softmax > threshold).
    buckets: padded sizes for the remaining examples (see module docstring).
    min_bucket: smallest default bucket.
    backend: `adaptive_vision.backend.Backend` whose compile options the
      programs use (default: `backend.choose(workload='serve')`).

  `predict(views)` returns numpy arrays: `predictions` [N] int32, `exit_index`
  [N] int32, `logits` [N, K] float32 (of the exit taken), and `counts` [E]
  (examples each branch ran on, before padding) and `padded_counts` [E].
  """

  def __init__(self, model, variables, thresholds, criterion: str = "entropy",
               buckets: Optional[Sequence[Any]] = None, min_bucket: int = 8,
               backend: Optional[backend_lib.Backend] = None):
    if criterion not in early_exit.CRITERIA:
      raise ValueError(f"unknown exit criterion {criterion!r}; valid: {early_exit.CRITERIA}")
    self.model = model
    self.variables = variables
    self.criterion = criterion
    self.buckets = None if buckets is None else tuple(buckets)
    self.min_bucket = int(min_bucket)
    self.num_exits = int(model.num_exits)
    self.thresholds = thresholds
    self.num_compiled = 0          # traces of the branch programs
    self.programs: set = set()     # keys (branch, bucket, N, view shape/dtype, gather)
    self.backend = backend or backend_lib.choose(workload="serve")
    self._step = self.backend.jit(self._step_impl, static_argnames=("k", "gather"))

  # -- configuration ---------------------------------------------------------

  def bucket_sizes(self, n: int) -> tuple[int, ...]:
    return resolve_buckets(n, self.buckets, self.min_bucket)

  def program_bound(self, n: int) -> int:
    """Most programs compiled for batches of n (one view placement)."""
    return 1 + (self.num_exits - 1) * len(self.bucket_sizes(n))

  def _bucket(self, count: int, n: int) -> int:
    for b in self.bucket_sizes(n):
      if b >= count:
        return b
    return n

  # -- the jitted step -------------------------------------------------------

  def _step_impl(self, variables, view, idx, carry_full, final_logits, threshold, *,
                 k: int, gather: bool):
    """Branch k on the examples `idx` (padded with n); returns (fires, logits buffer, carry)."""
    self.num_compiled += 1  # runs only while tracing
    n = final_logits.shape[0]
    self.programs.add((k, idx.shape[0], n, view.shape[1:], str(view.dtype), gather))
    valid = idx < n
    if gather:
      view = jnp.take(view, idx, axis=0, mode="clip")
    prev = None
    if carry_full is not None:
      prev = jax.tree_util.tree_map(lambda c: jnp.take(c, idx, axis=0, mode="clip"),
                                    carry_full)
    logits, carry = self.model.apply(variables, k, view, prev,
                                     method=type(self.model).branch)
    logits = logits.astype(jnp.float32)
    last = k == self.num_exits - 1
    fires = valid if last else valid & early_exit.logits_fire(logits, threshold, self.criterion)
    # Rows that exit here write their logits; others (and padding) are dropped.
    final_logits = final_logits.at[jnp.where(fires, idx, n)].set(logits, mode="drop")
    if last:
      return fires, final_logits, None
    stay = jnp.where(valid & ~fires, idx, n)
    new_carry = jax.tree_util.tree_map(
        lambda c: jnp.zeros((n,) + c.shape[1:], c.dtype).at[stay].set(c, mode="drop"),
        carry)
    return fires, final_logits, new_carry

  # -- inference ---------------------------------------------------------------

  def predict(self, views: Sequence[Any]) -> dict[str, np.ndarray]:
    """Dynamic inference on a batch given as a tuple of views, lowest resolution first."""
    views = self._check_views(views)
    n = int(views[0].shape[0])
    num_classes = int(self.model.num_classes)
    exit_index = np.full((n,), -1, dtype=np.int32)
    counts = np.zeros((self.num_exits,), dtype=np.int64)
    padded = np.zeros((self.num_exits,), dtype=np.int64)
    if n == 0:
      return dict(predictions=np.zeros((0,), np.int32), exit_index=exit_index,
                  logits=np.zeros((0, num_classes), np.float32), counts=counts,
                  padded_counts=padded)
    final_logits = jnp.zeros((n, num_classes), jnp.float32)
    remaining = np.arange(n, dtype=np.int32)
    carry = None
    thresholds = self._thresholds
    for k, view in enumerate(views):
      count = remaining.shape[0]
      if count == 0:
        break  # nobody left: skip this branch and the following ones
      on_device = isinstance(view, jax.Array)
      if k == 0:
        size, idx, gather = n, remaining, False  # everyone, in order: no gather
        x = view
      else:
        size = self._bucket(count, n)
        idx = np.full((size,), n, dtype=np.int32)
        idx[:count] = remaining
        gather = on_device
        # numpy views: gather only the remaining rows here, so only they travel.
        x = view if on_device else np.take(view, np.minimum(idx, n - 1), axis=0)
      t = thresholds[k] if k < self.num_exits - 1 else np.float32(0.0)
      fires, final_logits, carry = self._step(
          self.variables, x, idx, carry, final_logits, t, k=k, gather=gather)
      counts[k], padded[k] = count, size
      fired = np.asarray(fires)[:count]  # the one small transfer per branch
      exit_index[remaining[fired]] = k
      remaining = remaining[~fired]
    logits = np.asarray(final_logits)
    return dict(predictions=logits.argmax(-1).astype(np.int32), exit_index=exit_index,
                logits=logits, counts=counts, padded_counts=padded)

  __call__ = predict

  def _check_views(self, views) -> tuple:
    if not isinstance(views, (tuple, list)):
      raise ValueError(f"DynamicCascade.predict takes a tuple of views, one per "
                       f"branch ({self.num_exits}), lowest resolution first")
    if len(views) != self.num_exits:
      raise ValueError(f"got {len(views)} views for a cascade of {self.num_exits} "
                       "branches; give one view per branch")
    views = tuple(v if isinstance(v, jax.Array) else np.asarray(v) for v in views)
    sizes = {int(v.shape[0]) for v in views}
    if len(sizes) != 1:
      raise ValueError(f"views have different batch sizes {sorted(sizes)}")
    return views


def full_cascade_predict(model, variables, views, thresholds,
                         criterion: str = "entropy") -> dict[str, np.ndarray]:
  """Reference (static) inference: every branch on every example, then the policy.

  `views`: the model's input (a tuple of views for RAViT, an image batch for
  the single-input families). Returns the same keys as `DynamicCascade.predict`
  (without counts) plus `exit_logits` [E, N, K].
  """
  inputs = tuple(views) if isinstance(views, (tuple, list)) else views
  exit_logits, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, inputs)
  stacked = jnp.stack(exit_logits).astype(jnp.float32)
  exit_index = np.asarray(early_exit.exit_policy(stacked, thresholds, criterion))
  stacked = np.asarray(stacked)
  logits = stacked[exit_index, np.arange(stacked.shape[1])]
  return dict(predictions=logits.argmax(-1).astype(np.int32), exit_index=exit_index,
              logits=logits, exit_logits=stacked)


# ----------------------------------------------------------------------------
# One program per call: batch 1 and small batches


def _check_segmented(model) -> int:
  if not (hasattr(type(model), "segment") and hasattr(model, "num_exits")):
    raise ValueError(f"{type(model).__name__} has no `segment` method; early-exit "
                     "executors need one (RAViT, the vit family and the ResNets have it)")
  return int(model.num_exits)


def decide_xla(logits, state, threshold, *, exit: int, last: bool, criterion: str):
  """One exit's decision in XLA ops: rows of `state` [B, K + 1] (the logits of
  the exit taken, then its index; -1 while undecided) that are still
  undecided take `logits` [B, K] and the index `exit` where the criterion
  fires, or where this is the last exit. Returns `(state, undecided)`, the
  latter a bool scalar: whether a row is left for the next segment. A
  backend's decision kernel (`Backend.decide`) computes the same."""
  fires = state[:, -1] < 0  # undecided
  if not last:
    fires &= early_exit.logits_fire(logits, threshold, criterion)
  mine = jnp.concatenate([logits, jnp.full(logits.shape[:1] + (1,), exit, logits.dtype)], 1)
  state = jnp.where(fires[:, None], mine, state)
  return state, jnp.any(state[:, -1] < 0)


def cascade_program(model, criterion: str = "entropy", decide=None):
  """`run(variables, inputs, thresholds) -> (logits [B, K], exit_index [B])`, jittable.

  Segment 0 runs on the batch; segment k > 0 runs under `lax.cond` only if
  an example is still undecided after exit k-1, nested so that a skipped
  segment skips all later ones too. Decisions are those of
  `early_exit.exit_policy` (strict comparisons, first exit that fires, the
  last exit answers for the rest); `logits` are those of the exit taken.

  `decide`: how each exit's decision is computed: None for XLA's ops
  (`decide_xla`), or a backend's kernel with its signature (`Backend.decide`;
  on CPU one C++ call per exit, the softmax entropy or largest probability in
  float32, so a value within rounding of its threshold may decide the other
  way than XLA's). The logits are cast to float32.
  """
  if criterion not in early_exit.CRITERIA:
    raise ValueError(f"unknown exit criterion {criterion!r}; valid: {early_exit.CRITERIA}")
  num_exits = _check_segmented(model)
  method = type(model).segment
  how = decide or decide_xla

  def run(variables, inputs, thresholds):
    def segment(k, carry):
      logits, carry = model.apply(variables, k, inputs, carry, method=method)
      return logits.astype(jnp.float32), carry

    # One [B, K + 1] state, the logits of the exit taken and its index (-1:
    # undecided; small ints are exact in float32), updated once per exit, and
    # whether a row is left for the next segment. Fewer, chained operations:
    # XLA:CPU runs a program whose operations branch concurrently, handing
    # work between threads, which at batch 1 cost more than the decision
    # itself; a decision kernel makes each decision one operation
    # (results/bench_notes.md).
    def decide_k(k, logits, state):
      threshold = thresholds[min(k, num_exits - 2)] if num_exits > 1 else jnp.float32(0)
      return how(logits, state, threshold, exit=k, last=k == num_exits - 1,
                 criterion=criterion)

    def from_segment(k, carry, state, undecided):
      def go(_):
        logits, next_carry = segment(k, carry)
        state_k, undecided_k = decide_k(k, logits, state)
        if k == num_exits - 1:
          return state_k
        return from_segment(k + 1, next_carry, state_k, undecided_k)
      return jax.lax.cond(undecided, go, lambda _: state, None)

    logits, carry = segment(0, None)
    state = jnp.concatenate([jnp.zeros_like(logits),
                             jnp.full(logits.shape[:1] + (1,), -1, jnp.float32)], 1)
    state, undecided = decide_k(0, logits, state)
    if num_exits > 1:
      state = from_segment(1, carry, state, undecided)
    return state[:, :-1], state[:, -1].astype(jnp.int32)

  return run


class SingleDispatchCascade(_Thresholds):
  """Early exits as one compiled program per input shape (see `cascade_program`).

  Args:
    model: a module with `num_exits` and `segment(k, inputs, carry)`.
    variables: its variables (params, and batch_stats for the ResNets).
    thresholds: one per non-final exit (length E - 1, empty for one exit);
      changing them later does not recompile.
    criterion: 'entropy' or 'max_prob', as `early_exit.exit_policy`.
    embed_params: compile the variables into the program as constants (the
      default): a call then passes only the image and the thresholds, which
      at batch 1 saves the handling of every parameter array per call (~0.1
      ms for a CIFAR RAViT's ~100 arrays on a 2-core CPU); the variables can
      then not be swapped without a new executor. False passes them per call.
    backend: `adaptive_vision.backend.Backend` whose compile options and
      exit-decision kernel the program uses (default:
      `backend.choose(workload='serve')`).

  A process that serves one image per call and waits for each answer runs
  faster with the 'serve' process settings (`backend.setup('serve')`, as
  launch.predict does: on CPU, synchronous dispatch), set before its first
  computation.

  `predict(inputs)` takes the model's input (a tuple of views for RAViT, an
  image batch otherwise) and returns numpy `predictions` [B] int32,
  `exit_index` [B] int32 and `logits` [B, K] float32 of the exit taken; the
  device returns them as one array, so a call makes one transfer each way.
  """

  def __init__(self, model, variables, thresholds, criterion: str = "entropy", *,
               embed_params: bool = True, backend: Optional[backend_lib.Backend] = None):
    self.model = model
    self.criterion = criterion
    self.num_exits = _check_segmented(model)
    self.embed_params = bool(embed_params)
    self.backend = backend or backend_lib.choose(workload="serve")
    program = cascade_program(model, criterion, self.backend.decide)

    self.num_compiled = 0  # traces of the program (one per input shape)

    def packed(variables, inputs, thresholds):
      self.num_compiled += 1  # runs only while tracing
      logits, exit_index = program(variables, inputs, thresholds)
      # Exit indices are small ints, exact in float32.
      return jnp.concatenate([logits, exit_index[:, None].astype(jnp.float32)], axis=1)

    if self.embed_params:
      self.variables = jax.device_get(variables)  # numpy: XLA constants
      self._run = self.backend.jit(lambda x, t: packed(self.variables, x, t))
    else:
      self.variables = variables
      run = self.backend.jit(packed)
      self._run = lambda x, t: run(self.variables, x, t)
    self.thresholds = thresholds

  def _thresholds_changed(self) -> None:
    # On device once, so a call transfers only the image.
    self._device_thresholds = jnp.asarray(
        self._thresholds if self._thresholds.size else np.zeros((1,), np.float32))

  def run(self, inputs) -> jax.Array:
    """The program's device output, not fetched: [B, K + 1], the logits of
    the exit taken, then the exit index (as float32)."""
    return self._run(inputs, self._device_thresholds)

  def predict(self, inputs) -> dict[str, np.ndarray]:
    out = np.asarray(self.run(inputs))
    logits = out[:, :-1]
    return dict(predictions=logits.argmax(-1).astype(np.int32),
                exit_index=out[:, -1].astype(np.int32), logits=logits)

  __call__ = predict
