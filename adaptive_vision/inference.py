"""Dynamic early-exit inference that really skips work.

`DynamicCascade` runs segment 0 of an early-exit model on the whole batch,
decides on device which examples exit (the criterion and strict comparisons
of `adaptive_vision.early_exit.exit_policy`), brings back only that boolean
decision, and runs segment 1 on the examples that did not exit, and so on;
the last exit answers for everyone still there. A segment nobody reaches is
not run at all. It serves every family with `num_exits` and
`segment(k, inputs, carry)` (docs/design.md, "Model contract"): RAViT, whose
segments are its branches, and the ERDE ResNets, whose segments are the
stages between exit heads.

Static shapes. The remaining examples are padded up to a *bucket* size, so
`jax.jit` compiles at most one program per (segment, bucket) for a batch size
N and input placement (numpy or device) -- never one per count. The default
buckets (`default_buckets`) bound the waste at every N: a count c runs as at
most max(8, floor(1.125 c)) rows, under 12.5% padding from c = 8 on. They
are the fewest sizes that do: 8, 10, 12, 14, 16, 19, 22, ..., 646, 727, 819,
922, ... (each the largest the bound allows after the previous, about 6 per
doubling, the same for every N), those below N, then N: 27 sizes for N=256,
38 for N=1000 or 1024, 44 for 2048; `max_padding` trades the bound for fewer
(0.25: 21 at N=1000). Segment 0 runs on exactly N and segment 1 on one of
the B buckets; a later segment's program also depends on the bucket of the
segment before it (its carry's rows), so at most `program_bound(N)` =
1 + B + (E - 2) B^2 programs are compiled per N and placement (1 + B for a
two-exit model), and only for the buckets counts fall into
(`num_compiled`): a stream of batches at fixed thresholds lands in a few.
Padding, rather than splitting a count into several power-of-two chunks,
keeps one call per segment, whose fixed cost (dispatch, argument handling,
an accelerator's latency floor at small batch) is then paid once. `buckets`
may instead list sizes (ints; N is always added as the largest) or fractions
of N (floats in (0, 1], rounded up).

Data movement per segment k > 0: the padded index vector of the remaining
examples goes to the device, with the remaining rows of only the inputs
segment k reads (found once per input layout by tracing it: view k of a
RAViT, none for a ResNet's later stages, which continue from the carry;
numpy inputs are gathered on the host, device inputs on device), and one
boolean vector of exit decisions comes back. The carry (RAViT's class token
/ logits, a ResNet's feature map) stays on device as segment k produced it,
one row per example it ran on; segment k+1 takes the rows of the examples
still there by their positions (sent with the index vector), so no [N, ...]
buffer is filled and scattered (for a ResNet's feature maps that cost ~8% of
the batch's time). The logits of the exit taken are scattered into an [N, K]
device buffer that is fetched once at the end.

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

import bisect
import fractions
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision import backend as backend_lib
from adaptive_vision import early_exit

MAX_PADDING = 0.125  # default bound on a bucket's padding, as a fraction of the count


def default_buckets(n: int, min_bucket: int = 8,
                    max_padding: float = MAX_PADDING) -> tuple[int, ...]:
  """The fewest sizes that pad any count c <= n to at most
  max(min_bucket, floor((1 + max_padding) c)): `min_bucket`, then each size
  the largest allowed after the previous one, floor((1 + max_padding) (b + 1)),
  those below n, then n."""
  if n <= 0:
    return ()
  if not max_padding > 0:
    raise ValueError(f"max_padding must be positive, got {max_padding!r}")
  growth = 1 + fractions.Fraction(max_padding)  # exact: no float rounding at the bound
  sizes, b = [], max(1, int(min_bucket))
  while b < n:
    sizes.append(b)
    b = math.floor((b + 1) * growth)
  return tuple(sizes) + (n,)


def resolve_buckets(n: int, buckets: Optional[Sequence[Any]] = None,
                    min_bucket: int = 8,
                    max_padding: float = MAX_PADDING) -> tuple[int, ...]:
  """Sorted bucket sizes for a batch of n; n is always the largest."""
  if n <= 0:
    return ()
  if buckets is None:
    return default_buckets(n, min_bucket, max_padding)
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


def _check_segmented(model) -> int:
  if not (hasattr(type(model), "segment") and hasattr(model, "num_exits")):
    raise ValueError(f"{type(model).__name__} has no `segment` method; early-exit "
                     "executors need one (RAViT, the vit family and the ResNets have it)")
  return int(model.num_exits)


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


def _abstract(x, batch: int):
  return jax.ShapeDtypeStruct((batch,) + tuple(x.shape[1:]), x.dtype)


def _reads(closed_jaxpr) -> list[bool]:
  """Which inputs of a traced function any operation (or output) uses."""
  jaxpr = closed_jaxpr.jaxpr
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  used |= {id(v) for v in jaxpr.outvars}
  return [id(v) in used for v in jaxpr.invars]


class DynamicCascade(_Thresholds):
  """Batched dynamic executor for an early-exit model (see the module docstring).

  Args:
    model: a module with `num_exits`, `num_classes` and
      `segment(k, inputs, carry)` (RAViT, the ERDE ResNets).
    variables: its variables (params, and batch_stats for the ResNets).
    thresholds: one per non-final exit (length E - 1), as in
      `early_exit.exit_policy`; changing them later (`cascade.thresholds = ...`)
      does not recompile.
    criterion: 'entropy' (exit when entropy < threshold) or 'max_prob'
      (exit when max softmax > threshold).
    buckets: padded sizes for the remaining examples (see module docstring);
      None: `default_buckets`.
    min_bucket: smallest default bucket.
    max_padding: the default buckets pad a count c >= min_bucket to at most
      (1 + max_padding) c.
    backend: `adaptive_vision.backend.Backend` whose compile options the
      programs use (default: `backend.choose(workload='serve')`).

  `predict(inputs)` takes the model's input (a tuple of views, lowest
  resolution first, for RAViT; an image batch for a ResNet) and returns
  numpy arrays: `predictions` [N] int32, `exit_index` [N] int32, `logits`
  [N, K] float32 (of the exit taken), and `counts` [E] (examples each
  segment ran on, before padding) and `padded_counts` [E].
  """

  def __init__(self, model, variables, thresholds, criterion: str = "entropy",
               buckets: Optional[Sequence[Any]] = None, min_bucket: int = 8,
               max_padding: float = MAX_PADDING,
               backend: Optional[backend_lib.Backend] = None):
    if criterion not in early_exit.CRITERIA:
      raise ValueError(f"unknown exit criterion {criterion!r}; valid: {early_exit.CRITERIA}")
    self.model = model
    self.variables = variables
    self.criterion = criterion
    self.buckets = None if buckets is None else tuple(buckets)
    self.min_bucket = int(min_bucket)
    self.max_padding = max_padding
    self.num_exits = _check_segmented(model)
    self.thresholds = thresholds
    self.num_compiled = 0          # traces of the segment programs
    self.programs: set = set()     # keys (segment, bucket, N, inputs read, gather, carry rows)
    self._plans: dict = {}         # input layout -> inputs each segment reads
    self._sizes: dict = {}         # N -> bucket sizes
    self.bucket_sizes(1)           # bad buckets fail here, not at the first batch
    self.backend = backend or backend_lib.choose(workload="serve")
    self._step = self.backend.jit(self._step_impl, static_argnames=("k", "layout"))

  # -- configuration ---------------------------------------------------------

  def bucket_sizes(self, n: int) -> tuple[int, ...]:
    if n not in self._sizes:
      self._sizes[n] = resolve_buckets(n, self.buckets, self.min_bucket, self.max_padding)
    return self._sizes[n]

  def program_bound(self, n: int) -> int:
    """Most programs compiled for batches of n (one input placement): segment
    k >= 2 depends on its bucket and on segment k-1's."""
    b = len(self.bucket_sizes(n))
    return 1 + (b if self.num_exits > 1 else 0) + max(self.num_exits - 2, 0) * b * b

  def _bucket(self, count: int, n: int) -> int:
    sizes = self.bucket_sizes(n)
    return sizes[min(bisect.bisect_left(sizes, count), len(sizes) - 1)]

  # -- which inputs each segment reads ---------------------------------------

  def _plan(self, treedef, leaves) -> tuple[tuple[bool, ...], ...]:
    """Per segment, which input leaves it reads; traced once per input layout
    (at batch 1: what a segment reads does not depend on the batch)."""
    key = (treedef, tuple((tuple(x.shape[1:]), str(x.dtype)) for x in leaves))
    if key in self._plans:
      return self._plans[key]
    model, method = self.model, type(self.model).segment
    one = jax.tree_util.tree_unflatten(treedef, [_abstract(x, 1) for x in leaves])
    # The model's own checks name a wrong input (e.g. RAViT's one view per branch).
    exit_logits, _ = jax.eval_shape(lambda v, x: model.apply(v, x), self.variables, one)
    if len(exit_logits) != self.num_exits:
      raise ValueError(f"{type(model).__name__} returned {len(exit_logits)} exits for "
                       f"num_exits={self.num_exits}")
    plan, carry = [], None
    for k in range(self.num_exits):
      def segment(xs, c, k=k):
        return model.apply(self.variables, k, jax.tree_util.tree_unflatten(treedef, xs),
                           c, method=method)
      closed, (_, carry_shape) = jax.make_jaxpr(segment, return_shape=True)(
          [_abstract(x, 1) for x in leaves], carry)
      plan.append(tuple(_reads(closed)[:len(leaves)]))
      carry = carry_shape
    self._plans[key] = tuple(plan)
    return self._plans[key]

  # -- the jitted step -------------------------------------------------------

  def _step_impl(self, variables, read, idx, pos, carry, final_logits, threshold, *,
                 k: int, layout):
    """Segment k on the examples `idx` (padded with n); returns (fires, logits
    buffer, carry). `carry`: segment k-1's, one row per example it ran on;
    `pos`: the row of each of `idx`'s examples there.

    `read`: the input leaves segment k reads, already its rows (gathered on
    the host) or all N rows (to gather here); `layout` (static) = (input
    treedef, per leaf None if unread else whether to gather, per unread leaf
    its row shape and dtype)."""
    self.num_compiled += 1  # runs only while tracing
    n = final_logits.shape[0]
    size = idx.shape[0]
    treedef, gathers, unread = layout
    carry_leaves = jax.tree_util.tree_leaves(carry)
    carry_rows = carry_leaves[0].shape[0] if carry_leaves else None
    self.programs.add((k, size, n, tuple((x.shape[1:], str(x.dtype)) for x in read),
                       tuple(g for g in gathers if g is not None), carry_rows))
    valid = idx < n
    take = lambda x: jnp.take(x, idx, axis=0, mode="clip")
    read, unread = iter(read), iter(unread)
    leaves = []
    for gather in gathers:
      if gather is None:  # not read by this segment: a shape XLA drops unused
        shape, dtype = next(unread)
        leaves.append(jnp.zeros((size,) + shape, dtype))
      else:
        x = next(read)
        leaves.append(take(x) if gather else x)
    inputs = jax.tree_util.tree_unflatten(treedef, leaves)
    prev = None if carry is None else jax.tree_util.tree_map(
        lambda c: jnp.take(c, pos, axis=0, mode="clip"), carry)
    logits, carry = self.model.apply(variables, k, inputs, prev,
                                     method=type(self.model).segment)
    logits = logits.astype(jnp.float32)
    last = k == self.num_exits - 1
    fires = valid if last else valid & early_exit.logits_fire(logits, threshold, self.criterion)
    # Rows that exit here write their logits; others (and padding) are dropped.
    final_logits = final_logits.at[jnp.where(fires, idx, n)].set(logits, mode="drop")
    return fires, final_logits, (None if last else carry)

  # -- inference ---------------------------------------------------------------

  def predict(self, inputs: Any) -> dict[str, np.ndarray]:
    """Dynamic inference on a batch: the model's input (RAViT: a tuple of
    views, lowest resolution first; a ResNet: one image batch)."""
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    leaves = [x if isinstance(x, jax.Array) else np.asarray(x) for x in leaves]
    sizes = {int(x.shape[0]) if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"inputs have different batch sizes {sorted(sizes, key=str)}; "
                       "give arrays with the batch first, all of one size")
    n = sizes.pop()
    plan = self._plan(treedef, leaves)
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
    carry, kept = None, None  # the previous segment's carry; positions of who stays
    thresholds = self._thresholds
    for k in range(self.num_exits):
      count = remaining.shape[0]
      if count == 0:
        break  # nobody left: skip this segment and the following ones
      if k == 0:
        size, idx, pos = n, remaining, None  # everyone, in order: no gather
      else:
        size = self._bucket(count, n)
        idx = np.full((size,), n, dtype=np.int32)
        idx[:count] = remaining
        pos = np.zeros((size,), dtype=np.int32)  # padding takes row 0, then is dropped
        pos[:count] = kept
      read, gathers, unread = [], [], []
      for x, reads in zip(leaves, plan[k]):
        if not reads:
          gathers.append(None)
          unread.append((tuple(x.shape[1:]), x.dtype))
        elif k == 0 or isinstance(x, jax.Array):
          gathers.append(k > 0)  # device inputs: gathered on device
          read.append(x)
        else:  # numpy inputs: gather only the remaining rows here, so only they travel
          gathers.append(False)
          read.append(np.take(x, np.minimum(idx, n - 1), axis=0))
      t = thresholds[k] if k < self.num_exits - 1 else np.float32(0.0)
      fires, final_logits, carry = self._step(
          self.variables, tuple(read), idx, pos, carry, final_logits, t, k=k,
          layout=(treedef, tuple(gathers), tuple(unread)))
      counts[k], padded[k] = count, size
      fired = np.asarray(fires)[:count]  # the one small transfer per segment
      exit_index[remaining[fired]] = k
      kept = np.flatnonzero(~fired).astype(np.int32)  # their rows in this segment's carry
      remaining = remaining[~fired]
    logits = np.asarray(final_logits)
    return dict(predictions=logits.argmax(-1).astype(np.int32), exit_index=exit_index,
                logits=logits, counts=counts, padded_counts=padded)

  __call__ = predict


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
