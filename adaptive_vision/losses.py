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

from adaptive_vision.config import require
from adaptive_vision.exits import as_exits

LOSS_NAMES = ("ce", "kd", "erde")
ENTROPY_MODES = ("maximize", "minimize", "off")


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


def _exit_weights(exit_weights: Sequence[float] | None, num_exits: int) -> tuple[float, ...]:
  if exit_weights is None:
    return (1.0,) * num_exits
  weights = tuple(float(w) for w in exit_weights)
  if len(weights) != num_exits:
    raise ValueError(f"got {len(weights)} exit_weights for {num_exits} exits; "
                     "give one weight per exit")
  return weights


def _check_pair(student: tuple, teacher: tuple) -> None:
  if len(student) != len(teacher):
    raise ValueError(f"got {len(student)} student exits but {len(teacher)} teacher exits; "
                     "they must match one-to-one (see match_teacher_exits)")


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
  if entropy_mode == "maximize":
    per_example = math.log(s.shape[-1]) - entropy(s)
  elif entropy_mode == "minimize":
    per_example = entropy(s)
  else:  # 'off'
    per_example = jnp.zeros_like(teacher_wrong)
  ent = entropy_weight * jnp.sum(per_example * teacher_wrong) / batch
  return {"ce": ce, "kd": kd, "entropy": ent, "loss": ce + kd + ent,
          "teacher_correct": jnp.mean(teacher_right)}


def _check_entropy_mode(entropy_mode: str) -> None:
  if entropy_mode not in ENTROPY_MODES:
    raise ValueError(f"unknown entropy_mode {entropy_mode!r}; valid: {ENTROPY_MODES}")


# --------------------------------------------------------------------------
# Composite losses
# --------------------------------------------------------------------------


def erde_loss(student_logits: Sequence[jax.Array], teacher_logits: Sequence[jax.Array],
              labels: jax.Array, *, temperature: float, kd_weight: float,
              entropy_weight: float, exit_weights: Sequence[float] | None = None,
              entropy_mode: str = "maximize", kl_on_wrong: bool = False,
              return_terms: bool = False):
  """ERDE loss (module docstring), summed over exits with ``exit_weights``.

  Args:
    student_logits, teacher_logits: sequences of [B, K], one per exit, same count
      (student exit i is distilled from teacher exit i).
    entropy_mode: 'maximize' (log K - H, the ERDE term), 'minimize' (+H,
      ablation) or 'off'.
    kl_on_wrong: keep the KL term on teacher-wrong examples too (ablation).
    return_terms: also return the weighted terms of each exit,
      ``(loss, {'ce': [...], 'kd': [...], 'entropy': [...], 'teacher_correct': [...]})``
      with one scalar per exit (teacher_correct: the fraction of examples the
      teacher exit gets right).
  """
  _check_entropy_mode(entropy_mode)
  student, teacher = as_exits(student_logits), as_exits(teacher_logits)
  _check_pair(student, teacher)
  weights = _exit_weights(exit_weights, len(student))
  total = 0.0
  terms = {"ce": [], "kd": [], "entropy": [], "teacher_correct": []}
  for w, s, t in zip(weights, student, teacher):
    exit_terms = _erde_terms(s, t, labels, temperature=temperature, kd_weight=kd_weight,
                             entropy_weight=entropy_weight, entropy_mode=entropy_mode,
                             kl_on_wrong=kl_on_wrong)
    total = total + w * exit_terms["loss"]
    for key, values in terms.items():
      values.append(exit_terms[key])
  return (total, terms) if return_terms else total


def kd_loss(student_logits: Sequence[jax.Array], teacher_logits: Sequence[jax.Array],
            labels: jax.Array, *, temperature: float, kd_weight: float,
            exit_weights: Sequence[float] | None = None, return_terms: bool = False):
  """Plain KD per exit: CE + kd_weight * T^2 * mean KL on every example.

  ``return_terms``: also return ``{'ce': [...], 'kd': [...]}``, one scalar per exit.
  """
  student, teacher = as_exits(student_logits), as_exits(teacher_logits)
  _check_pair(student, teacher)
  weights = _exit_weights(exit_weights, len(student))
  total = 0.0
  terms = {"ce": [], "kd": []}
  for w, s, t in zip(weights, student, teacher):
    ce = cross_entropy(s, labels)
    kd = kd_weight * temperature ** 2 * jnp.mean(kd_kl(s, t, temperature))
    total = total + w * (ce + kd)
    terms["ce"].append(ce)
    terms["kd"].append(kd)
  return (total, terms) if return_terms else total


def match_teacher_exits(num_student_exits: int, num_teacher_exits: int) -> list[int]:
  """Teacher exit index for each student exit, matched by relative depth.

  Student exit i (depth (i+1)/S) maps to the teacher exit j whose depth
  (j+1)/T is closest; ties go to the deeper exit; the last maps to the last.
  E.g. (3, 4) -> [0, 2, 3]; (4, 2) -> [0, 0, 1, 1]; (2, 4) -> [1, 3].
  """
  s, t = int(num_student_exits), int(num_teacher_exits)
  if s < 1 or t < 1:
    raise ValueError(f"exit counts must be >= 1, got student={s}, teacher={t}")
  out = []
  for i in range(s):
    # Compare |(j+1)/t - (i+1)/s| exactly in integers: |(j+1)*s - (i+1)*t|.
    dist = [abs((j + 1) * s - (i + 1) * t) for j in range(t)]
    best = min(dist)
    out.append(max(j for j in range(t) if dist[j] == best))  # ties -> deeper
  return out


def cascade_loss(exit_logits: Sequence[jax.Array], labels: jax.Array, *,
                 exit_weights: Sequence[float] | None = None,
                 self_distill_weight: float = 0.0, temperature: float = 1.0,
                 return_terms: bool = False):
  """RAViT loss: sum_k w_k CE(branch_k) + optional self-distillation.

  With ``self_distill_weight > 0`` the last branch teaches every earlier one:
  ``+ self_distill_weight * T^2 * mean KL(softmax(sg(last)/T) || softmax(branch_k/T))``
  for k < last (not scaled by exit weights). The teacher side is stop-gradient,
  so the KD terms never push the last branch toward the earlier ones.

  ``return_terms``: also return ``{'ce': [...], 'self_distill': [...]}`` (one CE
  per exit; one self-distillation term per exit but the last, none when
  ``self_distill_weight`` is 0).
  """
  exits = as_exits(exit_logits)
  weights = _exit_weights(exit_weights, len(exits))
  ces = [cross_entropy(x, labels) for x in exits]
  total = sum(w * c for w, c in zip(weights, ces))
  sds = []
  if self_distill_weight:  # static python float: skip the work when unused
    teacher = jax.lax.stop_gradient(exits[-1])
    sds = [self_distill_weight * temperature ** 2 * jnp.mean(kd_kl(x, teacher, temperature))
           for x in exits[:-1]]
    total = total + sum(sds)
  return (total, {"ce": ces, "self_distill": sds}) if return_terms else total


# --------------------------------------------------------------------------
# Config entry point
# --------------------------------------------------------------------------


LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def loss_from_config(loss_cfg: Any) -> LossFn:
  """Loss function ``(exit_logits, labels, teacher_exit_logits=None) -> (loss, metrics)``.

  ``loss_cfg.name`` chooses the loss, which is then exactly that public function:
  'ce' -> `cascade_loss` (plain models and RAViT; exit_weights,
  self_distill_weight, temperature), 'kd' -> `kd_loss` (exit_weights,
  temperature, kd_weight), 'erde' -> `erde_loss` (also entropy_weight,
  entropy_mode, kl_on_wrong). Every field comes from the config (defaults in
  configs/common.py `base_config()`); fields the chosen loss does not take are
  not read. For 'kd'/'erde' the teacher exits are paired with student exits by
  `match_teacher_exits`. ``exit_logits`` is a tuple of [B, K] (see
  `exits.as_exits` for the other accepted forms).

  Metrics: 'loss', 'ce/exit{i}', 'accuracy/exit{i}'; 'self_distill/exit{i}' for
  'ce' with self-distillation; 'kd/exit{i}' for 'kd'/'erde'; for 'erde' also
  'entropy/exit{i}', 'teacher_correct/exit{i}' (fraction of examples the
  matched teacher exit gets right) and 'teacher_correct' (its mean over exits).
  """
  read = lambda key: require(loss_cfg, key, "loss")
  name = read("name")
  if name not in LOSS_NAMES:
    raise ValueError(f"unknown loss name {name!r}; valid names: {LOSS_NAMES}")
  exit_weights = read("exit_weights")
  kw = dict(exit_weights=None if exit_weights is None else tuple(exit_weights),
            temperature=float(read("temperature")))
  if name == "ce":
    kw["self_distill_weight"] = float(read("self_distill_weight"))
    loss = lambda student, teacher, labels: cascade_loss(student, labels, **kw,
                                                         return_terms=True)
  else:
    kw["kd_weight"] = float(read("kd_weight"))
    if name == "erde":
      kw.update(entropy_weight=float(read("entropy_weight")),
                entropy_mode=str(read("entropy_mode")),
                kl_on_wrong=bool(read("kl_on_wrong")))
      _check_entropy_mode(kw["entropy_mode"])
    composite = erde_loss if name == "erde" else kd_loss
    loss = lambda student, teacher, labels: composite(student, teacher, labels, **kw,
                                                      return_terms=True)

  def loss_fn(exit_logits, labels, teacher_exit_logits=None):
    student = as_exits(exit_logits)
    teacher = None
    if name != "ce":
      if teacher_exit_logits is None:
        raise ValueError(f"loss {name!r} needs teacher_exit_logits (the teacher's exit "
                         "logits for this batch)")
      teacher_all = as_exits(teacher_exit_logits)
      teacher = [teacher_all[j] for j in match_teacher_exits(len(student), len(teacher_all))]
    total, terms = loss(student, teacher, labels)
    metrics = {f"accuracy/exit{i}": accuracy(s, labels) for i, s in enumerate(student)}
    for key, values in terms.items():
      for i, value in enumerate(values):
        metrics[f"{key}/exit{i}"] = value
    if name == "erde":
      metrics["teacher_correct"] = sum(terms["teacher_correct"]) / len(student)
    metrics["loss"] = total
    return total, metrics

  return loss_fn


__all__ = [
    "LOSS_NAMES", "ENTROPY_MODES", "cross_entropy", "kd_kl", "entropy", "accuracy",
    "erde_loss", "kd_loss", "match_teacher_exits", "cascade_loss", "loss_from_config",
]
