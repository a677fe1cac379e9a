"""Tests of adaptive_vision.losses against numpy hand computations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_vision import losses
from configs.common import base_config

B, K = 6, 4


def loss_config(**fields):
  """The base config's loss section with `fields` set (every key present)."""
  c = base_config().loss
  c.update(fields)
  return c


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_ce(x, y):
  return -np_log_softmax(x)[np.arange(len(y)), y]


def np_kl(s, t, temp):
  lt, ls = np_log_softmax(t / temp), np_log_softmax(s / temp)
  return (np.exp(lt) * (lt - ls)).sum(-1)


def np_entropy(x):
  lp = np_log_softmax(x)
  return -(np.exp(lp) * lp).sum(-1)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, K, B)
  student = [rng.normal(size=(B, K)).astype(np.float32) for _ in range(2)]
  teacher = [rng.normal(size=(B, K)).astype(np.float32) * 3 for _ in range(2)]
  return student, teacher, labels


def with_teacher_correct(t, labels, correct):
  """Teacher logits whose argmax equals the label exactly where `correct`."""
  t = np.array(t)
  for i, ok in enumerate(correct):
    target = labels[i] if ok else (labels[i] + 1) % K
    t[i, target] = t[i].max() + 1.0
  return t


def test_pieces_by_hand():
  # K=2 hand values: student (1/2, 1/2), teacher (3/4, 1/4).
  s = jnp.array([[0.0, 0.0]])
  t = jnp.array([[math.log(3.0), 0.0]])
  kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812
  assert float(losses.kd_kl(s, t, 1.0)[0]) == pytest.approx(kl, rel=1e-5)
  assert float(losses.entropy(s)[0]) == pytest.approx(math.log(2.0), rel=1e-6)
  assert float(losses.cross_entropy(t, jnp.array([1]))) == pytest.approx(math.log(4.0), rel=1e-6)


def test_pieces_vs_numpy(data):
  (s, _), (t, _), y = data
  np.testing.assert_allclose(losses.cross_entropy(s, y), np_ce(s, y).mean(), rtol=1e-5)
  mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
  np.testing.assert_allclose(losses.cross_entropy(s, y, mask=mask),
                             np_ce(s, y)[mask > 0].mean(), rtol=1e-5)
  assert float(losses.cross_entropy(s, y, mask=np.zeros(B))) == 0.0
  for temp in (1.0, 4.0):
    np.testing.assert_allclose(losses.kd_kl(s, t, temp), np_kl(s, t, temp), rtol=1e-4,
                               atol=1e-6)
  np.testing.assert_allclose(losses.kd_kl(s, s, 2.0), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.entropy(s), np_entropy(s), rtol=1e-5)
  # Teacher side is a target: no gradient into it.
  g = jax.grad(lambda tt: losses.kd_kl(s, tt, 2.0).sum())(jnp.asarray(t))
  np.testing.assert_array_equal(g, 0.0)


KW = dict(temperature=3.0, kd_weight=0.7, entropy_weight=0.4)


def erde_by_hand(s, t, y, correct, *, mode="maximize", kl_on_wrong=False):
  c = np.asarray(correct, np.float64)
  kl_mask = np.ones_like(c) if kl_on_wrong else c
  kd = KW["kd_weight"] * KW["temperature"] ** 2 * (np_kl(s, t, KW["temperature"]) * kl_mask)
  if mode == "maximize":
    ent = math.log(K) - np_entropy(s)
  elif mode == "minimize":
    ent = np_entropy(s)
  else:
    ent = np.zeros(len(y))
  return np_ce(s, y).mean() + kd.sum() / len(y) + KW["entropy_weight"] * (ent * (1 - c)).sum() / len(y)


@pytest.mark.parametrize("correct", [[1] * B, [0] * B, [1, 0, 1, 1, 0, 0]])
def test_erde_teacher_correct_wrong_mixed(data, correct):
  (s, _), (t, _), y = data
  t = with_teacher_correct(t, y, correct)
  got = losses.erde_loss([s], [t], y, **KW)
  np.testing.assert_allclose(got, erde_by_hand(s, t, y, correct), rtol=1e-5)
  if all(correct):   # = CE + kd term, no entropy
    want = np_ce(s, y).mean() + 0.7 * 9 * np_kl(s, t, 3.0).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
  if not any(correct):  # = CE + entropy term, no KL
    want = np_ce(s, y).mean() + 0.4 * (math.log(K) - np_entropy(s)).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("mode", ["minimize", "off"])
def test_erde_entropy_modes(data, mode):
  (s, _), (t, _), y = data
  correct = [1, 0, 1, 1, 0, 0]
  t = with_teacher_correct(t, y, correct)
  got = losses.erde_loss([s], [t], y, entropy_mode=mode, **KW)
  np.testing.assert_allclose(got, erde_by_hand(s, t, y, correct, mode=mode), rtol=1e-5)


def test_erde_kl_on_wrong(data):
  (s, _), (t, _), y = data
  correct = [1, 0, 1, 1, 0, 0]
  t = with_teacher_correct(t, y, correct)
  got = losses.erde_loss([s], [t], y, kl_on_wrong=True, **KW)
  np.testing.assert_allclose(got, erde_by_hand(s, t, y, correct, kl_on_wrong=True), rtol=1e-5)


def test_erde_exit_weights_and_errors(data):
  (s0, s1), (t0, t1), y = data
  c0, c1 = [1, 0, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1]
  t0, t1 = with_teacher_correct(t0, y, c0), with_teacher_correct(t1, y, c1)
  got = losses.erde_loss([s0, s1], [t0, t1], y, exit_weights=(0.3, 2.0), **KW)
  want = 0.3 * erde_by_hand(s0, t0, y, c0) + 2.0 * erde_by_hand(s1, t1, y, c1)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="2 student exits but 1 teacher"):
    losses.erde_loss([s0, s1], [t0], y, **KW)
  with pytest.raises(ValueError, match="exit_weights"):
    losses.erde_loss([s0, s1], [t0, t1], y, exit_weights=(1.0,), **KW)
  with pytest.raises(ValueError, match="entropy_mode"):
    losses.erde_loss([s0], [t0], y, entropy_mode="max", **KW)


def test_kd_loss(data):
  (s0, s1), (t0, t1), y = data
  got = losses.kd_loss([s0, s1], [t0, t1], y, temperature=2.0, kd_weight=0.5,
                       exit_weights=(1.0, 0.5))
  per = [np_ce(s, y).mean() + 0.5 * 4.0 * np_kl(s, t, 2.0).mean()
         for s, t in ((s0, t0), (s1, t1))]
  np.testing.assert_allclose(got, per[0] + 0.5 * per[1], rtol=1e-5)


@pytest.mark.parametrize("s, t, want", [
    (3, 4, [0, 2, 3]), (4, 2, [0, 0, 1, 1]), (2, 4, [1, 3]), (3, 3, [0, 1, 2]),
    (2, 3, [1, 2]), (1, 4, [3]), (4, 1, [0, 0, 0, 0]),
])
def test_match_teacher_exits(s, t, want):
  assert losses.match_teacher_exits(s, t) == want


def test_cascade_loss(data):
  (s0, s1), (t0, _), y = data
  exits = [s0, s1, t0]
  got = losses.cascade_loss(exits, y, exit_weights=(0.5, 1.0, 2.0))
  want = 0.5 * np_ce(s0, y).mean() + np_ce(s1, y).mean() + 2.0 * np_ce(t0, y).mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got = losses.cascade_loss(exits, y, self_distill_weight=0.3, temperature=2.0)
  want = sum(np_ce(x, y).mean() for x in exits) + 0.3 * 4.0 * (
      np_kl(s0, t0, 2.0).mean() + np_kl(s1, t0, 2.0).mean())
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cascade_self_distillation_does_not_train_last_branch(data):
  (s0, s1), (t0, _), y = data

  def kd_part(last, first):
    ex = [first, s1, last]
    return (losses.cascade_loss(ex, y, self_distill_weight=0.5, temperature=2.0)
            - losses.cascade_loss(ex, y))

  g_last, g_first = jax.grad(kd_part, argnums=(0, 1))(jnp.asarray(t0), jnp.asarray(s0))
  np.testing.assert_allclose(g_last, 0.0, atol=1e-7)
  assert float(jnp.abs(g_first).sum()) > 1e-3


def test_loss_from_config(data):
  (s0, s1), (t0, t1), y = data
  ce = losses.loss_from_config(loss_config(name="ce"))
  loss, m = ce((s0, s1), y)
  np.testing.assert_allclose(loss, np_ce(s0, y).mean() + np_ce(s1, y).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["ce/exit1"], np_ce(s1, y).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["accuracy/exit0"], (s0.argmax(-1) == y).mean())
  # A single-exit model's [B, K] logits work too.
  loss1, _ = ce(s0, y)
  np.testing.assert_allclose(loss1, np_ce(s0, y).mean(), rtol=1e-5)

  cfg = loss_config(name="erde", temperature=3.0, kd_weight=0.7, entropy_weight=0.4,
                    exit_weights=None, entropy_mode="maximize", kl_on_wrong=False,
                    self_distill_weight=0.0)
  erde = jax.jit(losses.loss_from_config(cfg))
  # 2 student exits vs 4 teacher exits -> teacher exits [1, 3].
  teacher4 = [t1, t0, t1 * 0.5, t0]
  loss, m = erde((s0, s1), y, teacher4)
  want = losses.erde_loss([s0, s1], [t0, t0], y, **KW)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m["teacher_correct/exit0"], (t0.argmax(-1) == y).mean())
  assert {"loss", "ce/exit0", "kd/exit1", "entropy/exit1", "teacher_correct"} <= set(m)

  kd = losses.loss_from_config(loss_config(name="kd", temperature=2.0, kd_weight=0.5))
  loss, _ = kd((s0, s1), y, (t0, t1))
  np.testing.assert_allclose(
      loss, losses.kd_loss([s0, s1], [t0, t1], y, temperature=2.0, kd_weight=0.5), rtol=1e-6)

  with pytest.raises(ValueError, match="needs teacher_exit_logits"):
    kd((s0, s1), y)
  with pytest.raises(ValueError, match=r"valid names: \('ce', 'kd', 'erde'\)"):
    losses.loss_from_config(loss_config(name="focal"))


def test_loss_from_config_runs_the_public_losses(data):
  """Each name runs exactly its public function; per-exit metrics are its terms."""
  (s0, s1), (t0, t1), y = data
  ce = losses.loss_from_config(loss_config(name="ce", exit_weights=(0.5, 2.0),
                                           self_distill_weight=0.3, temperature=2.0))
  loss, m = ce((s0, s1), y)
  np.testing.assert_allclose(loss, losses.cascade_loss(
      (s0, s1), y, exit_weights=(0.5, 2.0), self_distill_weight=0.3, temperature=2.0),
      rtol=1e-6)
  np.testing.assert_allclose(m["self_distill/exit0"], 0.3 * 4.0 * np_kl(s0, s1, 2.0).mean(),
                             rtol=1e-5)
  assert "self_distill/exit1" not in m

  kw = dict(temperature=3.0, kd_weight=0.7, entropy_weight=0.4, entropy_mode="minimize",
            kl_on_wrong=True, exit_weights=(1.0, 0.5))
  erde = losses.loss_from_config(loss_config(name="erde", **kw))
  loss, m = erde((s0, s1), y, (t0, t1))
  want, terms = losses.erde_loss((s0, s1), (t0, t1), y, return_terms=True, **kw)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(loss, losses.erde_loss((s0, s1), (t0, t1), y, **kw), rtol=1e-6)
  for i in range(2):
    for key in ("ce", "kd", "entropy", "teacher_correct"):
      np.testing.assert_allclose(m[f"{key}/exit{i}"], terms[key][i], rtol=1e-6)
  np.testing.assert_allclose(m["ce/exit1"], np_ce(s1, y).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["entropy/exit0"],
                             0.4 * (np_entropy(s0) * (t0.argmax(-1) != y)).sum() / B, rtol=1e-5)


def test_erde_by_name_from_base_config_keeps_the_entropy_term(data):
  """--config.loss.name=erde on a config without erde_config still has the entropy term."""
  (s0, _), (t0, _), y = data
  correct = [1, 0, 1, 1, 0, 0]
  t0 = with_teacher_correct(t0, y, correct)
  cfg = loss_config(name="erde")
  assert cfg.entropy_weight == 0.5
  loss, m = losses.loss_from_config(cfg)((s0,), y, (t0,))
  want = (math.log(K) - np_entropy(s0)) * (1 - np.asarray(correct))
  np.testing.assert_allclose(m["entropy/exit0"], 0.5 * want.sum() / B, rtol=1e-5)
  assert float(m["entropy/exit0"]) > 0
  np.testing.assert_allclose(loss, losses.erde_loss(
      [s0], [t0], y, temperature=1.0, kd_weight=1.0, entropy_weight=0.5), rtol=1e-6)


@pytest.mark.parametrize("name, missing", [
    ("ce", "exit_weights"), ("ce", "self_distill_weight"), ("kd", "kd_weight"),
    ("erde", "entropy_weight"), ("erde", "kl_on_wrong")])
def test_missing_loss_key_is_a_one_line_error(name, missing):
  cfg = loss_config(name=name)
  del cfg[missing]
  with pytest.raises(ValueError, match=rf"^config key loss\.{missing} is missing; configs "
                                       r"start from configs\.common\.base_config\(\)") as e:
    losses.loss_from_config(cfg)
  assert "\n" not in str(e.value)
  # Keys the chosen loss does not take are not read.
  if name == "ce":
    cfg = loss_config(name="ce")
    del cfg["entropy_weight"], cfg["kd_weight"]
    losses.loss_from_config(cfg)
