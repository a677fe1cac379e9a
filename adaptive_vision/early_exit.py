"""Exit criteria, exit policy, threshold sweep, calibration and the oracle.

Conventions (see docs/design.md, "Logits file contract"):

* ``exit_logits``: ``[E, N, K]`` array (or a sequence of E ``[N, K]`` arrays),
  cheapest exit first.
* ``exit_macs``: ``[E]`` cumulative MACs per image to reach and evaluate each exit
  (non-decreasing).
* ``thresholds``: one per NON-FINAL exit (length ``E - 1``); the last exit always
  answers. An example takes the first exit whose criterion fires:

  - ``'entropy'`` (default, as in RAViT): exit ``e`` fires when
    ``H(softmax(logits_e)) < thresholds[e]`` (natural log).
  - ``'max_prob'``: exit ``e`` fires when ``max softmax(logits_e) > thresholds[e]``.

Both comparisons are strict, so for entropy ``0.0`` means "nobody exits" and any
value above ``log K`` means "everyone exits"; for max_prob ``1.0`` means nobody
and ``0.0`` means everyone.

``exit_policy`` and ``evaluate_policy_core`` are jittable; the other public
functions are thin numpy wrappers that validate inputs and return numpy / python
values.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision.exits import as_exits

CRITERIA = ("entropy", "max_prob")

# Upper bound on threshold combinations evaluated by `calibrate` for E > 2 exits.
DEFAULT_MAX_GRID_POINTS = 4096
# Upper bound on elements (points * exits * examples) evaluated per batched call;
# keeps memory modest when many thresholds are evaluated at once.
_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------
# Criteria
# --------------------------------------------------------------------------


def softmax_entropy(logits: jax.Array) -> jax.Array:
  """Shannon entropy (nats) of softmax over the last axis; ``[..., K] -> [...]``."""
  # log_softmax keeps this finite for large logits; every term -p*log p >= 0.
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def max_probability(logits: jax.Array) -> jax.Array:
  """Largest softmax probability over the last axis; ``[..., K] -> [...]``."""
  return jnp.exp(jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _check_criterion(criterion: str) -> None:
  if criterion not in CRITERIA:
    raise ValueError(f"unknown exit criterion {criterion!r}; valid: {CRITERIA}")


def _scores(logits: jax.Array, criterion: str) -> jax.Array:
  """Per-exit, per-example criterion value ``[E, N]``."""
  if criterion == "entropy":
    return softmax_entropy(logits)
  return max_probability(logits)


_scores_jit = jax.jit(_scores, static_argnames="criterion")


def fires(scores: jax.Array, threshold: jax.Array, criterion: str) -> jax.Array:
  """Whether an exit fires for criterion values `scores` (of `_scores`):
  entropy strictly below, largest probability strictly above the threshold."""
  return scores < threshold if criterion == "entropy" else scores > threshold


def logits_fire(logits: jax.Array, threshold: jax.Array, criterion: str) -> jax.Array:
  """`fires` from exit logits [..., K] (the executors' per-exit decision)."""
  return fires(_scores(logits, criterion), threshold, criterion)


def _nobody_threshold(criterion: str) -> float:
  """A threshold at which no example exits (strict comparisons)."""
  return 0.0 if criterion == "entropy" else 1.0


def _everyone_threshold(criterion: str, num_classes: int,
                        scores: np.ndarray | None = None) -> float:
  """A threshold at which every example exits."""
  if criterion == "max_prob":
    return 0.0  # max softmax >= 1/K > 0
  # Entropy <= log K; the margin absorbs float32 rounding of near-uniform rows.
  t = float(np.log(num_classes)) + 1e-4
  if scores is not None and scores.size:
    t = max(t, float(np.nextafter(np.float32(scores.max()), np.float32(np.inf))))
  return t


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------


def thresholds_at_exit(exit: int, num_exits: int, criterion: str,
                       num_classes: int) -> np.ndarray:
  """Thresholds under which every example leaves at exit `exit` (for timing a
  cascade exit by exit): nobody fires before it, everyone fires there."""
  _check_criterion(criterion)
  if not 0 <= exit < num_exits:
    raise ValueError(f"exit {exit} of a {num_exits}-exit model")
  t = np.full(num_exits - 1, _nobody_threshold(criterion), np.float32)
  if exit < num_exits - 1:
    t[exit] = _everyone_threshold(criterion, num_classes)
  return t


def _stack(exit_logits: Any) -> jax.Array:
  """[E, N, K] array from an [E, N, K] array, one [N, K] array (one exit) or a
  sequence of [N, K] arrays (`exits.as_exits` normalises)."""
  exits = as_exits(exit_logits)
  if not exits:
    raise ValueError("exit_logits is empty; need at least one exit")
  shapes = {tuple(np.shape(x)) for x in exits}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"exit_logits must be [E, N, K] (or a sequence of [N, K] of one "
                     f"shape), got exits of shapes {sorted(shapes)}")
  return jnp.stack([jnp.asarray(x) for x in exits])


def _check_thresholds(thresholds: Any, num_exits: int) -> jax.Array:
  """Thresholds as a float [E-1] array; shape checks are static so jit is fine."""
  t = jnp.asarray(thresholds, dtype=jnp.float32)
  if t.ndim == 0:
    t = t.reshape(1)
  if t.ndim != 1 or t.shape[0] != num_exits - 1:
    n = t.shape[0] if t.ndim == 1 else f"an array of shape {tuple(t.shape)} as"
    raise ValueError(f"got {n} thresholds for {num_exits} exits; "
                     f"give one per non-final exit ({num_exits - 1})")
  return t


def _check_finite(logits: np.ndarray) -> None:
  bad = ~np.isfinite(logits)
  if bad.any():
    counts = bad.reshape(bad.shape[0], -1).sum(axis=1)
    e = int(np.argmax(counts > 0))
    raise ValueError(f"exit {e} has {int(counts[e])} non-finite logits (NaN or inf); "
                     f"non-finite counts per exit: {counts.tolist()}")


def _prepare(exit_logits: Any, labels: Any, exit_macs: Any
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validated (logits f32 [E,N,K], labels int [N], macs f64 [E]) on the host."""
  logits = np.asarray(_stack(exit_logits), dtype=np.float32)
  num_exits, n, k = logits.shape
  _check_finite(logits)
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"labels has shape {labels.shape} but exit logits hold N={n} "
                     f"examples; expected labels of shape ({n},)")
  if n and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if n and (labels.min() < 0 or labels.max() >= k):
    raise ValueError(f"labels must lie in [0, {k}) for K={k} classes, "
                     f"got range [{labels.min()}, {labels.max()}]")
  macs = np.asarray(exit_macs, dtype=np.float64).reshape(-1)
  if macs.shape[0] != num_exits:
    raise ValueError(f"exit_macs has {macs.shape[0]} entries for {num_exits} exits; "
                     "give the cumulative MACs of each exit")
  if not np.all(np.isfinite(macs)) or np.any(np.diff(macs) < 0):
    raise ValueError("exit_macs must be finite and non-decreasing (cumulative MACs "
                     f"per exit), got {macs.tolist()}")
  return logits, labels.astype(np.int64), macs


# --------------------------------------------------------------------------
# Policy (jittable)
# --------------------------------------------------------------------------


def _policy_from_scores(scores: jax.Array, thresholds: jax.Array,
                        criterion: str) -> jax.Array:
  """Exit index [N] from scores [E, N] and thresholds [E-1]."""
  fired = fires(scores[:-1], thresholds[:, None], criterion)
  last = jnp.ones((1, scores.shape[1]), dtype=bool)
  # argmax of a boolean returns the first True: the first exit that fires.
  return jnp.argmax(jnp.concatenate([fired, last], axis=0), axis=0).astype(jnp.int32)


def exit_policy(exit_logits: Any, thresholds: Any,
                criterion: str = "entropy") -> jax.Array:
  """Exit taken by each example, ``[N]`` int32 (jittable).

  Args:
    exit_logits: ``[E, N, K]`` or a sequence of E ``[N, K]`` arrays.
    thresholds: ``[E - 1]``, one per non-final exit.
    criterion: ``'entropy'`` or ``'max_prob'``.
  """
  _check_criterion(criterion)
  logits = _stack(exit_logits)
  t = _check_thresholds(thresholds, logits.shape[0])
  if not isinstance(logits, jax.core.Tracer):  # values are only checkable outside jit
    _check_finite(np.asarray(logits))
  return _policy_from_scores(_scores(logits, criterion), t, criterion)


@functools.partial(jax.jit, static_argnames="criterion")
def evaluate_policy_core(exit_logits: jax.Array, labels: jax.Array,
                         thresholds: jax.Array, exit_macs: jax.Array,
                         criterion: str = "entropy") -> dict[str, jax.Array]:
  """Jitted core of `evaluate_policy` (no validation, array outputs).

  Returns exit_index [N], predictions [N], accuracy, mean_macs, exit_fractions [E].
  """
  logits = jnp.asarray(exit_logits)
  num_exits, n, _ = logits.shape
  t = _check_thresholds(thresholds, num_exits)
  idx = _policy_from_scores(_scores(logits, criterion), t, criterion)
  preds_all = jnp.argmax(logits, axis=-1)                        # [E, N]
  preds = jnp.take_along_axis(preds_all, idx[None], axis=0)[0]
  fractions = jnp.sum(jax.nn.one_hot(idx, num_exits), axis=0) / n
  return {
      "exit_index": idx,
      "predictions": preds,
      "accuracy": jnp.mean(preds == labels),
      "mean_macs": jnp.sum(fractions * jnp.asarray(exit_macs, jnp.float32)),
      "exit_fractions": fractions,
  }


def evaluate_policy(exit_logits: Any, labels: Any, thresholds: Any, exit_macs: Any,
                    criterion: str = "entropy") -> dict[str, Any]:
  """Accuracy and compute of the threshold policy.

  Returns a dict: ``exit_index`` [N] and ``predictions`` [N] (numpy),
  ``accuracy`` and ``mean_macs`` (python floats; mean over examples of the
  cumulative MACs of the exit taken), ``exit_fractions`` [E] (numpy).
  """
  _check_criterion(criterion)
  logits, labels, macs = _prepare(exit_logits, labels, exit_macs)
  t = _check_thresholds(thresholds, logits.shape[0])
  out = jax.device_get(evaluate_policy_core(logits, labels, t, macs.astype(np.float32),
                                            criterion=criterion))
  counts = np.bincount(out["exit_index"], minlength=logits.shape[0])
  n = max(labels.shape[0], 1)
  return {
      "exit_index": np.asarray(out["exit_index"]),
      "predictions": np.asarray(out["predictions"]),
      # Recomputed in float64 from counts: MACs ~1e9 lose digits in float32.
      "accuracy": float(np.sum(out["predictions"] == labels) / n),
      "mean_macs": float(counts @ macs / n),
      "exit_fractions": counts / n,
  }


# --------------------------------------------------------------------------
# Batched evaluation of many threshold vectors
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="criterion")
def _points_batch(scores: jax.Array, correct: jax.Array, thresholds: jax.Array,
                  criterion: str) -> tuple[jax.Array, jax.Array]:
  """(num_correct [P], exit counts [P, E]) for thresholds [P, E-1]."""
  num_exits = scores.shape[0]

  def one(t):
    idx = _policy_from_scores(scores, t, criterion)
    hit = jnp.take_along_axis(correct, idx[None], axis=0)[0]
    counts = jnp.sum(jax.nn.one_hot(idx, num_exits, dtype=jnp.int32), axis=0)
    return jnp.sum(hit.astype(jnp.int32)), counts

  return jax.vmap(one)(thresholds)


def _evaluate_many(scores: np.ndarray, correct: np.ndarray, thresholds: np.ndarray,
                   criterion: str) -> tuple[np.ndarray, np.ndarray]:
  """Chunked `_points_batch` so memory stays bounded for large grids."""
  num_exits, n = scores.shape
  chunk = max(1, _CHUNK_ELEMENTS // max(num_exits * n, 1))
  nc, cnt = [], []
  for start in range(0, thresholds.shape[0], chunk):
    a, b = _points_batch(scores, correct, thresholds[start:start + chunk].astype(np.float32),
                         criterion=criterion)
    nc.append(np.asarray(a))
    cnt.append(np.asarray(b))
  return np.concatenate(nc), np.concatenate(cnt)


def _scores_and_correct(logits: np.ndarray, labels: np.ndarray, criterion: str
                        ) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(_scores_jit(logits, criterion=criterion))
  correct = np.argmax(logits, axis=-1) == labels[None]
  return scores, correct


def _point(thresholds, num_correct, counts, macs, n) -> dict[str, Any]:
  n = max(n, 1)
  return {
      "thresholds": np.asarray(thresholds, dtype=np.float64),
      "accuracy": float(num_correct / n),
      "mean_macs": float(counts @ macs / n),
      "exit_fractions": counts / n,
  }


# --------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------


def threshold_sweep(exit_logits: Any, labels: Any, exit_macs: Any,
                    criterion: str = "entropy", num_points: int = 50,
                    thresholds: Any = None) -> list[dict[str, Any]]:
  """Operating points tracing the accuracy / compute curve.

  By default the grid runs from "everyone exits first" to "everyone reaches the
  last exit". With E > 2 exits ONE SHARED threshold is used for all non-final
  exits (the RAViT practice); interior grid values are quantiles of the pooled
  non-final scores, so the curve is sampled densely where examples actually
  are, plus the two end points. Duplicate values are dropped.

  Args:
    thresholds: optional explicit grid: 1-D (shared values, kept in order) or
      ``[P, E - 1]`` (one row of per-exit thresholds per point).

  Returns:
    list of dicts with ``thresholds`` [E-1], ``accuracy``, ``mean_macs`` and
    ``exit_fractions`` [E].
  """
  _check_criterion(criterion)
  logits, labels, macs = _prepare(exit_logits, labels, exit_macs)
  num_exits, n, k = logits.shape
  scores, correct = _scores_and_correct(logits, labels, criterion)
  if num_exits == 1:
    grid = np.zeros((1, 0))
  elif thresholds is not None:
    grid = np.asarray(thresholds, dtype=np.float64)
    if grid.ndim == 1:
      grid = np.repeat(grid[:, None], num_exits - 1, axis=1)
    if grid.ndim != 2 or grid.shape[1] != num_exits - 1:
      raise ValueError(f"explicit threshold grid must be 1-D (shared) or [P, {num_exits - 1}], "
                       f"got shape {grid.shape}")
  else:
    if num_points < 2:
      raise ValueError(f"num_points must be >= 2, got {num_points}")
    pooled = scores[:-1].reshape(-1)
    interior = num_points - 2
    levels = (np.arange(interior) + 0.5) / max(interior, 1)
    values = np.quantile(pooled, levels) if interior else np.zeros(0)
    ends = [_nobody_threshold(criterion), _everyone_threshold(criterion, k, pooled)]
    values = np.unique(np.concatenate([values.astype(np.float32), np.float32(ends)]))
    # Order from "everyone exits first" to "everyone goes to the last exit".
    values = values[::-1] if criterion == "entropy" else values
    grid = np.repeat(values[:, None].astype(np.float64), num_exits - 1, axis=1)
  num_correct, counts = _evaluate_many(scores, correct, grid, criterion)
  return [_point(grid[i], num_correct[i], counts[i], macs, n) for i in range(grid.shape[0])]


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------


def _two_exit_candidates(scores: np.ndarray, correct: np.ndarray, macs: np.ndarray,
                         criterion: str, num_classes: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every distinct operating point of a 2-exit model, exactly, in O(N log N).

  Returns (thresholds [C, 1], num_correct [C], mean_macs [C]).
  """
  n = scores.shape[1]
  # key < t  <=>  the example exits at exit 0 (negate for max_prob: p > t <=> -p < -t).
  key = scores[0] if criterion == "entropy" else -scores[0]
  order = np.argsort(key, kind="stable")
  sorted_key = key[order]
  cum0 = np.concatenate([[0], np.cumsum(correct[0][order])])
  cum1 = np.concatenate([[0], np.cumsum(correct[1][order])])
  u = np.unique(sorted_key)
  exits0 = np.concatenate([np.searchsorted(sorted_key, u, side="left"), [n]])
  num_correct = cum0[exits0] + cum1[-1] - cum1[exits0]
  mean_macs = (exits0 * macs[0] + (n - exits0) * macs[1]) / max(n, 1)
  # Thresholds: midpoints between consecutive distinct keys generalise better
  # than the observed values themselves; ends are the explicit nobody/everyone.
  t_key = np.empty(len(u) + 1, dtype=np.float32)
  if len(u) > 1:
    mid = ((u[:-1].astype(np.float64) + u[1:]) / 2).astype(np.float32)
    # If rounding to float32 collapsed the midpoint onto the lower key, use the
    # upper key itself (strict '<' still excludes it).
    t_key[1:-1] = np.where(mid > u[:-1], mid, u[1:])
  sign = 1.0 if criterion == "entropy" else -1.0
  t = sign * t_key.astype(np.float64)
  t[0] = _nobody_threshold(criterion)
  t[-1] = _everyone_threshold(criterion, num_classes, scores[0])
  return t[:, None], num_correct, mean_macs


def _grid_candidates(scores: np.ndarray, correct: np.ndarray, macs: np.ndarray,
                     criterion: str, num_classes: int, max_grid_points: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Product grid of per-exit quantile thresholds for E > 2 exits."""
  num_exits, n = scores.shape
  per_exit = max(2, int(np.floor(max_grid_points ** (1.0 / (num_exits - 1)) + 1e-9)))
  axes = []
  for e in range(num_exits - 1):
    interior = per_exit - 2
    levels = (np.arange(interior) + 0.5) / max(interior, 1)
    values = np.quantile(scores[e], levels) if interior else np.zeros(0)
    ends = [_nobody_threshold(criterion), _everyone_threshold(criterion, num_classes, scores[e])]
    axes.append(np.unique(np.concatenate([values.astype(np.float32), np.float32(ends)])))
  grid = np.stack([g.reshape(-1) for g in np.meshgrid(*axes, indexing="ij")], axis=1)
  grid = grid.astype(np.float64)
  num_correct, counts = _evaluate_many(scores, correct, grid, criterion)
  return grid, num_correct, counts @ macs / max(n, 1)


def calibrate(val_exit_logits: Any, val_labels: Any, exit_macs: Any, *,
              max_mean_macs: float | None = None, min_accuracy: float | None = None,
              criterion: str = "entropy",
              max_grid_points: int = DEFAULT_MAX_GRID_POINTS) -> np.ndarray:
  """Thresholds chosen on a VALIDATION split (never pass test logits here).

  Give exactly one constraint:

  * ``max_mean_macs``: maximise validation accuracy s.t. mean MACs <= budget
    (ties: fewer MACs);
  * ``min_accuracy`` (fraction in [0, 1]): minimise mean MACs s.t. validation
    accuracy >= target (ties: higher accuracy).

  Search: for E = 2 every distinct operating point (threshold midway between
  consecutive distinct validation scores, plus both ends) is scored exactly.
  For E > 2, a product grid of per-exit thresholds, each axis holding
  ``floor(max_grid_points ** (1 / (E - 1)))`` values (quantiles of that exit's
  validation scores plus the nobody/everyone ends; 64 per axis for E = 3).

  Returns:
    float64 array of E - 1 thresholds.

  Raises:
    ValueError: if no candidate meets the constraint (message has the best
      achievable value).
  """
  if (max_mean_macs is None) == (min_accuracy is None):
    raise ValueError("give exactly one of max_mean_macs or min_accuracy")
  _check_criterion(criterion)
  logits, labels, macs = _prepare(val_exit_logits, val_labels, exit_macs)
  num_exits, n, k = logits.shape
  scores, correct = _scores_and_correct(logits, labels, criterion)
  if num_exits == 1:
    grid = np.zeros((1, 0))
    num_correct = correct.sum(axis=1)
    mean_macs = macs.copy()
  elif num_exits == 2:
    grid, num_correct, mean_macs = _two_exit_candidates(scores, correct, macs, criterion, k)
  else:
    grid, num_correct, mean_macs = _grid_candidates(scores, correct, macs, criterion, k,
                                                    max_grid_points)
  acc = num_correct / max(n, 1)
  if max_mean_macs is not None:
    # Relative slack: a budget equal to an exit's MACs must admit that exit.
    feasible = mean_macs <= max_mean_macs * (1 + 1e-9) + 1e-9
    if not feasible.any():
      raise ValueError(f"no thresholds keep validation mean MACs <= {max_mean_macs:.6g}; "
                       f"the lowest achievable is {mean_macs.min():.6g}")
    # lexsort: last key is primary. Max accuracy, then min MACs.
    cand = np.flatnonzero(feasible)
    best = cand[np.lexsort((mean_macs[cand], -acc[cand]))[0]]
  else:
    feasible = acc >= min_accuracy - 1e-12
    if not feasible.any():
      raise ValueError(f"no thresholds reach validation accuracy >= {min_accuracy:.6g}; "
                       f"the best achievable is {acc.max():.6g}")
    cand = np.flatnonzero(feasible)
    best = cand[np.lexsort((-acc[cand], mean_macs[cand]))[0]]
  return np.asarray(grid[best], dtype=np.float64)


# --------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------


def oracle(exit_logits: Any, labels: Any, exit_macs: Any) -> dict[str, Any]:
  """Each example exits at the FIRST correct exit; one that no exit gets right
  exits at the first exit (it is wrong wherever it stops, so the cheapest).

  This is the lowest compute any policy over these exits can reach at the
  best accuracy any policy can reach (accuracy = rate of "some exit is right").
  Returns dict(accuracy, mean_macs, exit_fractions [E]).
  """
  logits, labels, macs = _prepare(exit_logits, labels, exit_macs)
  num_exits, n, _ = logits.shape
  correct = np.argmax(logits, axis=-1) == labels[None]           # [E, N]
  any_correct = correct.any(axis=0)
  idx = np.where(any_correct, np.argmax(correct, axis=0), 0)
  counts = np.bincount(idx, minlength=num_exits)
  n = max(n, 1)
  return {
      "accuracy": float(any_correct.sum() / n),
      "mean_macs": float(counts @ macs / n),
      "exit_fractions": counts / n,
  }


def per_exit_accuracy(exit_logits: Any, labels: Any) -> np.ndarray:
  """Accuracy of each exit alone, ``[E]``."""
  logits = np.asarray(_stack(exit_logits))
  labels = np.asarray(labels)
  return (np.argmax(logits, axis=-1) == labels[None]).mean(axis=1)


__all__ = [
    "CRITERIA", "softmax_entropy", "max_probability", "exit_policy",
    "evaluate_policy_core", "evaluate_policy", "threshold_sweep", "calibrate",
    "oracle", "per_exit_accuracy", "thresholds_at_exit",
]
