"""Losses for early-exit models: CE, KD, entropy, ERDE and the RAViT cascade.

All functions are pure functions of arrays and jittable; the only python
branching is on static things (number of exits, config strings and weights).

ERDE (fixed by the project) for exit i with student logits s_i, teacher
logits t_i, labels y, K classes and temperature T::

    L_i = CE(s_i, y)
          + kd_weight * T^2 * KL(softmax(t_i/T) || softmax(s_i/T)) * [argmax t_i == y]
          + entropy_weight * (log K - H(softmax(s_i)))            * [argmax t_i != y]
    L   = sum_i w_i L_i

Each term is a mean over ALL batch examples of the masked per-example term
(sum(term * mask) / B). The T^2 factor is applied in the composites
(`erde_loss`, `kd_loss`, `cascade_loss`), not in `kd_kl`, so that gradient
magnitudes stay comparable across temperatures (Hinton et al.).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

LOSS_NAMES = ('ce', 'kd', 'erde')
ENTROPY_MODES = ('maximize', 'minimize', 'off')


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, *,
                  mask: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross entropy; with ``mask`` [B] the mean over mask weight.

  The mask is for padded eval batches (0 = padding); an all-zero mask gives 0.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if mask is None:
    return jnp.mean(nll)
  mask = mask.astype(nll.dtype)
  total = jnp.sum(mask)
  return jnp.sum(nll * mask) / jnp.where(total > 0, total, 1.0)


def kd_kl(student_logits: jax.Array, teacher_logits: jax.Array,
          temperature: float) -> jax.Array:
  """Per-example ``KL(softmax(t/T) || softmax(s/T))``, shape [B].

  Teacher probabilities are targets: no gradient flows into ``teacher_logits``.
  No T^2 factor here (the composites apply it).
  """
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  s_logp = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)


def entropy(logits: jax.Array) -> jax.Array:
  """Per-example Shannon entropy (nats) of softmax(logits), shape [B]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy (fraction)."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _as_exits(logits: Any) -> tuple[jax.Array, ...]:
  """A tuple of [B, K] arrays from one [B, K] array, an [E, B, K] array or a sequence."""
  if isinstance(logits, (list, tuple)):
    return tuple(logits)
  if getattr(logits, 'ndim', None) == 2:
    return (logits,)
  if getattr(logits, 'ndim', None) == 3:
    return tuple(logits[i] for i in range(logits.shape[0]))
  raise ValueError(f'expected [B, K] logits or a sequence of them, got {type(logits)}')


def _exit_weights(exit_weights: Sequence[float] | None, num_exits: int) -> tuple[float, ...]:
  if exit_weights is None:
    return (1.0,) * num_exits
  weights = tuple(float(w) for w in exit_weights)
  if len(weights) != num_exits:
    raise ValueError(f'got {len(weights)} exit_weights for {num_exits} exits; '
                     'give one weight per exit')
  return weights


def _check_pair(student: tuple, teacher: tuple) -> None:
  if len(student) != len(teacher):
    raise ValueError(f'got {len(student)} student exits but {len(teacher)} teacher exits; '
                     'they must match one-to-one (see match_teacher_exits)')


def _erde_terms(s: jax.Array, t: jax.Array, labels: jax.Array, *, temperature: float,
                kd_weight: float, entropy_weight: float, entropy_mode: str,
                kl_on_wrong: bool) -> dict[str, jax.Array]:
  """Weighted ERDE terms of one exit plus the teacher-correct fraction."""
  batch = s.shape[0]
  teacher_right = (jnp.argmax(t, axis=-1) == labels).astype(s.dtype)
  teacher_wrong = 1.0 - teacher_right
  ce = cross_entropy(s, labels)
  kl_mask = jnp.ones_like(teacher_right) if kl_on_wrong else teacher_right
  kd = kd_weight * temperature ** 2 * jnp.sum(kd_kl(s, t, temperature) * kl_mask) / batch
  if entropy_mode == 'maximize':
    per_example = math.log(s.shape[-1]) - entropy(s)
  elif entropy_mode == 'minimize':
    per_example = entropy(s)
  else:  # 'off'
    per_example = jnp.zeros_like(teacher_wrong)
  ent = entropy_weight * jnp.sum(per_example * teacher_wrong) / batch
  return {'ce': ce, 'kd': kd, 'entropy': ent, 'loss': ce + kd + ent,
          'teacher_correct': jnp.mean(teacher_right)}


def _check_entropy_mode(entropy_mode: str) -> None:
  if entropy_mode not in ENTROPY_MODES:
    raise ValueError(f'unknown entropy_mode {entropy_mode!r}; valid: {ENTROPY_MODES}')


# --------------------------------------------------------------------------
# Composite losses
# --------------------------------------------------------------------------


def erde_loss(student_logits: Sequence[jax.Array], teacher_logits: Sequence[jax.Array],
              labels: jax.Array, *, temperature: float, kd_weight: float,
              entropy_weight: float, exit_weights: Sequence[float] | None = None,
              entropy_mode: str = 'maximize', kl_on_wrong: bool = False) -> jax.Array:
  """ERDE loss (module docstring), summed over exits with ``exit_weights``.

  Args:
    student_logits, teacher_logits: sequences of [B, K], one per exit, same count
      (student exit i is distilled from teacher exit i).
    entropy_mode: 'maximize' (log K - H, the ERDE term), 'minimize' (+H,
      ablation) or 'off'.
    kl_on_wrong: keep the KL term on teacher-wrong examples too (ablation).
  """
  _check_entropy_mode(entropy_mode)
  student, teacher = _as_exits(student_logits), _as_exits(teacher_logits)
  _check_pair(student, teacher)
  weights = _exit_weights(exit_weights, len(student))
  total = 0.0
  for w, s, t in zip(weights, student, teacher):
    terms = _erde_terms(s, t, labels, temperature=temperature, kd_weight=kd_weight,
                        entropy_weight=entropy_weight, entropy_mode=entropy_mode,
                        kl_on_wrong=kl_on_wrong)
    total = total + w * terms['loss']
  return total


def kd_loss(student_logits: Sequence[jax.Array], teacher_logits: Sequence[jax.Array],
            labels: jax.Array, *, temperature: float, kd_weight: float,
            exit_weights: Sequence[float] | None = None) -> jax.Array:
  """Plain KD per exit: CE + kd_weight * T^2 * mean KL on every example."""
  student, teacher = _as_exits(student_logits), _as_exits(teacher_logits)
  _check_pair(student, teacher)
  weights = _exit_weights(exit_weights, len(student))
  total = 0.0
  for w, s, t in zip(weights, student, teacher):
    kd = kd_weight * temperature ** 2 * jnp.mean(kd_kl(s, t, temperature))
    total = total + w * (cross_entropy(s, labels) + kd)
  return total


def match_teacher_exits(num_student_exits: int, num_teacher_exits: int) -> list[int]:
  """Teacher exit index for each student exit, matched by relative depth.

  Student exit i (depth (i+1)/S) maps to the teacher exit j whose depth
  (j+1)/T is closest; ties go to the deeper exit; the last maps to the last.
  E.g. (3, 4) -> [0, 2, 3]; (4, 2) -> [0, 0, 1, 1]; (2, 4) -> [1, 3].
  """
  s, t = int(num_student_exits), int(num_teacher_exits)
  if s < 1 or t < 1:
    raise ValueError(f'exit counts must be >= 1, got student={s}, teacher={t}')
  out = []
  for i in range(s):
    # Compare |(j+1)/t - (i+1)/s| exactly in integers: |(j+1)*s - (i+1)*t|.
    dist = [abs((j + 1) * s - (i + 1) * t) for j in range(t)]
    best = min(dist)
    out.append(max(j for j in range(t) if dist[j] == best))  # ties -> deeper
  return out


def cascade_loss(exit_logits: Sequence[jax.Array], labels: jax.Array, *,
                 exit_weights: Sequence[float] | None = None,
                 self_distill_weight: float = 0.0, temperature: float = 1.0) -> jax.Array:
  """RAViT loss: sum_k w_k CE(branch_k) + optional self-distillation.

  With ``self_distill_weight > 0`` the last branch teaches every earlier one:
  ``+ self_distill_weight * T^2 * mean KL(softmax(sg(last)/T) || softmax(branch_k/T))``
  for k < last (not scaled by exit weights). The teacher side is stop-gradient,
  so the KD terms never push the last branch toward the earlier ones.
  """
  return _cascade_terms(_as_exits(exit_logits), labels, exit_weights=exit_weights,
                        self_distill_weight=self_distill_weight,
                        temperature=temperature)['loss']


def _cascade_terms(exits: tuple, labels: jax.Array, *, exit_weights, self_distill_weight,
                   temperature) -> dict[str, Any]:
  weights = _exit_weights(exit_weights, len(exits))
  ces = [cross_entropy(x, labels) for x in exits]
  total = sum(w * c for w, c in zip(weights, ces))
  sds = []
  if self_distill_weight:  # static python float: skip the work when unused
    teacher = jax.lax.stop_gradient(exits[-1])
    sds = [self_distill_weight * temperature ** 2 * jnp.mean(kd_kl(x, teacher, temperature))
           for x in exits[:-1]]
    total = total + sum(sds)
  return {'loss': total, 'ce': ces, 'self_distill': sds}


# --------------------------------------------------------------------------
# Config entry point
# --------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)
  return default if value is None else value


LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def loss_from_config(loss_cfg: Any) -> LossFn:
  """Loss function ``(exit_logits, labels, teacher_exit_logits=None) -> (loss, metrics)``.

  ``loss_cfg.name``: 'ce' (`cascade_loss`; plain models and RAViT), 'kd'
  (`kd_loss`) or 'erde' (`erde_loss`). Optional fields (defaults):
  exit_weights (all 1), self_distill_weight (0), temperature (1),
  kd_weight (1), entropy_weight (1), entropy_mode ('maximize'), kl_on_wrong
  (False). For 'kd'/'erde' the teacher exits are paired with student exits by
  `match_teacher_exits`. ``exit_logits`` may be one [B, K] array or a sequence.

  Metrics: 'loss', 'ce/exit{i}', 'accuracy/exit{i}'; 'self_distill/exit{i}' for
  'ce' with self-distillation; 'kd/exit{i}' for 'kd'/'erde'; for 'erde' also
  'entropy/exit{i}', 'teacher_correct/exit{i}' (fraction of examples the
  matched teacher exit gets right) and 'teacher_correct' (its mean over exits).
  """
  name = _get(loss_cfg, 'name', None)
  if name not in LOSS_NAMES:
    raise ValueError(f'unknown loss name {name!r}; valid names: {LOSS_NAMES}')
  exit_weights = _get(loss_cfg, 'exit_weights', None)
  exit_weights = None if exit_weights is None else tuple(exit_weights)
  temperature = float(_get(loss_cfg, 'temperature', 1.0))
  self_distill_weight = float(_get(loss_cfg, 'self_distill_weight', 0.0))
  kd_weight = float(_get(loss_cfg, 'kd_weight', 1.0))
  entropy_weight = float(_get(loss_cfg, 'entropy_weight', 1.0))
  entropy_mode = str(_get(loss_cfg, 'entropy_mode', 'maximize'))
  kl_on_wrong = bool(_get(loss_cfg, 'kl_on_wrong', False))
  _check_entropy_mode(entropy_mode)

  def loss_fn(exit_logits, labels, teacher_exit_logits=None):
    student = _as_exits(exit_logits)
    metrics = {}
    for i, s in enumerate(student):
      metrics[f'accuracy/exit{i}'] = accuracy(s, labels)
    if name == 'ce':
      terms = _cascade_terms(student, labels, exit_weights=exit_weights,
                             self_distill_weight=self_distill_weight,
                             temperature=temperature)
      for i, c in enumerate(terms['ce']):
        metrics[f'ce/exit{i}'] = c
      for i, sd in enumerate(terms['self_distill']):
        metrics[f'self_distill/exit{i}'] = sd
      metrics['loss'] = terms['loss']
      return terms['loss'], metrics

    if teacher_exit_logits is None:
      raise ValueError(f"loss {name!r} needs teacher_exit_logits (the teacher's exit "
                       'logits for this batch)')
    teacher_all = _as_exits(teacher_exit_logits)
    teacher = [teacher_all[j] for j in match_teacher_exits(len(student), len(teacher_all))]
    weights = _exit_weights(exit_weights, len(student))
    total = 0.0
    fractions = []
    for i, (w, s, t) in enumerate(zip(weights, student, teacher)):
      if name == 'erde':
        terms = _erde_terms(s, t, labels, temperature=temperature, kd_weight=kd_weight,
                            entropy_weight=entropy_weight, entropy_mode=entropy_mode,
                            kl_on_wrong=kl_on_wrong)
        metrics[f'entropy/exit{i}'] = terms['entropy']
        metrics[f'teacher_correct/exit{i}'] = terms['teacher_correct']
        fractions.append(terms['teacher_correct'])
      else:  # 'kd': KL on every example, no entropy term
        ce = cross_entropy(s, labels)
        kd = kd_weight * temperature ** 2 * jnp.mean(kd_kl(s, t, temperature))
        terms = {'ce': ce, 'kd': kd, 'loss': ce + kd}
      metrics[f'ce/exit{i}'] = terms['ce']
      metrics[f'kd/exit{i}'] = terms['kd']
      total = total + w * terms['loss']
    if fractions:
      metrics['teacher_correct'] = sum(fractions) / len(fractions)
    metrics['loss'] = total
    return total, metrics

  return loss_fn


__all__ = [
    'LOSS_NAMES', 'ENTROPY_MODES', 'cross_entropy', 'kd_kl', 'entropy', 'accuracy',
    'erde_loss', 'kd_loss', 'match_teacher_exits', 'cascade_loss', 'loss_from_config',
]
