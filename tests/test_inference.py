"""Dynamic early-exit executors: same answers as the policy on all exits, bounded compiles.

`DynamicCascade` (batches: RAViT, the ERDE ResNets) and `SingleDispatchCascade`
(one program per call: RAViT, the ViT, the ERDE ResNets) are both checked
against the static policy over every exit (`full_cascade_predict`); the
bucketed executor's padding and program count against their stated bounds."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_vision import early_exit
from adaptive_vision.inference import (DynamicCascade, SingleDispatchCascade, cascade_program,
                                       default_buckets, full_cascade_predict, resolve_buckets)
from adaptive_vision import backend as backend_lib
from adaptive_vision.models.ravit import RAViT

# Both ways a single-dispatch cascade decides: XLA's ops, and the CPU
# backend's C++ kernel.
DECIDES = ["xla", pytest.param("native", marks=pytest.mark.requires("native"))]
# The native decision in the single-dispatch programs: in the slow set (its kernel
# against XLA is in tests/test_cpu_native.py).
DECIDES_SLOW_NATIVE = ["xla", pytest.param("native", marks=[pytest.mark.requires("native"),
                                                          pytest.mark.slow])]


def _backend(decide: str):
  return backend_lib.choose(dict(decide=decide), None, "serve")

NUM_CLASSES = 5
N = 24


def _branch(resolution, width=16):
  return dict(resolution=resolution, width=width, depth=1, num_heads=2, mlp_dim=32,
              patch_size=4, head_zero_init=False)


@functools.lru_cache(maxsize=None)
def _setup(num_branches, reuse="token"):
  res = (8, 16, 32)[:num_branches]
  widths = (16, 24, 16)[:len(res)]
  model = RAViT(branches=tuple(_branch(r, w) for r, w in zip(res, widths)),
                num_classes=NUM_CLASSES, reuse=reuse)
  rng = np.random.default_rng(num_branches)
  views = tuple(rng.normal(size=(N, r, r, 3)).astype(np.float32) for r in res)
  variables = jax.jit(model.init)(jax.random.key(num_branches), views)
  # Larger head weights spread the exits' entropies over a wide range.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 3.0 if "head" in jax.tree_util.keystr(p) else x, variables["params"])
  variables = {"params": params}
  apply = jax.jit(lambda v, x: model.apply(v, x)[0])
  exit_logits = np.stack([np.asarray(x) for x in apply(variables, views)])
  return model, variables, views, exit_logits, apply


def _mid_thresholds(scores, quantiles):
  """Thresholds halfway between two neighbouring scores (robust to rounding)."""
  s = np.sort(scores)
  out = []
  for q in quantiles:
    i = int(np.clip(round(q * (len(s) - 1)), 0, len(s) - 2))
    while s[i + 1] - s[i] < 1e-4 and i + 2 < len(s):
      i += 1
    assert s[i + 1] - s[i] >= 1e-4
    out.append(float(0.5 * (s[i] + s[i + 1])))
  return out


def _scores(logits, criterion):
  fn = early_exit.softmax_entropy if criterion == "entropy" else early_exit.max_probability
  return np.asarray(fn(jnp.asarray(logits)))


def _check_against_policy(result, exit_logits, thresholds, criterion):
  ref_exit = np.asarray(early_exit.exit_policy(exit_logits, thresholds, criterion))
  np.testing.assert_array_equal(result["exit_index"], ref_exit)
  ref_logits = exit_logits[ref_exit, np.arange(exit_logits.shape[1])]
  np.testing.assert_array_equal(result["predictions"], ref_logits.argmax(-1))
  np.testing.assert_allclose(result["logits"], ref_logits, rtol=1e-5, atol=1e-5)
  # Branch k ran on exactly the examples whose exit is >= k.
  expected_counts = [(ref_exit >= k).sum() for k in range(exit_logits.shape[0])]
  np.testing.assert_array_equal(result["counts"], expected_counts)
  assert np.all(result["padded_counts"] >= result["counts"])
  return ref_exit


def _threshold_sets(exit_logits, criterion):
  e = exit_logits.shape[0]
  scores = [_scores(exit_logits[k], criterion) for k in range(e - 1)]
  mids = [_mid_thresholds(s, (0.2, 0.5, 0.8)) for s in scores]
  if criterion == "entropy":
    everyone, nobody, negative = 1e9, 0.0, -1.0
  else:
    everyone, nobody, negative = 0.0, 1.0, 2.0
  sets = [[m[i] for m in mids] for i in range(3)]
  sets += [[everyone] * (e - 1), [nobody] * (e - 1), [negative] * (e - 1)]
  if e == 3:
    sets += [[nobody, everyone], [mids[0][1], nobody], [everyone, nobody]]
  return sets


@pytest.mark.parametrize("num_branches", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
def test_matches_policy_on_all_exits(num_branches, criterion):
  model, variables, views, exit_logits, _ = _setup(num_branches)
  cascade = DynamicCascade(model, variables, [0.0] * (num_branches - 1), criterion)
  seen_exits = set()
  for thresholds in _threshold_sets(exit_logits, criterion):
    cascade.thresholds = thresholds
    result = cascade.predict(views)
    ref_exit = _check_against_policy(result, exit_logits, thresholds, criterion)
    seen_exits.update(ref_exit.tolist())
    assert result["predictions"].shape == (N,) and result["logits"].shape == (N, NUM_CLASSES)
    for c, padded in zip(result["counts"][1:], result["padded_counts"][1:]):
      assert c == padded == 0 or c <= padded <= min(N, _padding_bound(c))
  assert seen_exits == set(range(num_branches))  # every exit was taken at some point
  assert cascade.num_compiled <= cascade.program_bound(N)
  # Segment k was given view k alone: the other views' rows never travel.
  for k, _, _, read, _, _ in cascade.programs:
    assert read == ((views[k].shape[1:], "float32"),)


@pytest.mark.parametrize("num_branches", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_everyone_exits_first_and_nobody_exits_early(num_branches):
  model, variables, views, exit_logits, _ = _setup(num_branches)
  e = num_branches
  cascade = DynamicCascade(model, variables, [1e9] * (e - 1))
  everyone = cascade.predict(views)
  np.testing.assert_array_equal(everyone["exit_index"], np.zeros(N))
  np.testing.assert_array_equal(everyone["counts"], [N] + [0] * (e - 1))  # skipped
  np.testing.assert_array_equal(everyone["predictions"], exit_logits[0].argmax(-1))
  assert cascade.num_compiled == 1  # only branch 0 was ever compiled

  cascade.thresholds = [-1.0] * (e - 1)
  nobody = cascade.predict(views)
  np.testing.assert_array_equal(nobody["exit_index"], np.full(N, e - 1))
  np.testing.assert_array_equal(nobody["counts"], [N] * e)
  np.testing.assert_array_equal(nobody["predictions"], exit_logits[-1].argmax(-1))
  np.testing.assert_allclose(nobody["logits"], exit_logits[-1], rtol=1e-5, atol=1e-5)


def test_device_views_match_host_views():
  model, variables, views, exit_logits, _ = _setup(3)
  thresholds = _threshold_sets(exit_logits, "entropy")[1]
  host = DynamicCascade(model, variables, thresholds).predict(views)
  device = DynamicCascade(model, variables, thresholds).predict(
      tuple(jnp.asarray(v) for v in views))
  for key in ("exit_index", "predictions", "counts"):
    np.testing.assert_array_equal(host[key], device[key])
  np.testing.assert_allclose(host["logits"], device["logits"], rtol=1e-5, atol=1e-6)
  _check_against_policy(device, exit_logits, thresholds, "entropy")


def test_full_cascade_predict_is_the_policy():
  model, variables, views, exit_logits, _ = _setup(2)
  t = _threshold_sets(exit_logits, "entropy")[1]
  ref = full_cascade_predict(model, variables, views, t)
  np.testing.assert_allclose(ref["exit_logits"], exit_logits, rtol=1e-5, atol=1e-6)
  _check_against_policy(dict(ref, counts=[(ref["exit_index"] >= k).sum() for k in range(2)],
                             padded_counts=np.full(2, N)), exit_logits, t, "entropy")


@pytest.mark.parametrize("num_branches,buckets", [(2, None), pytest.param(3, None, marks=pytest.mark.slow),
                                                  (3, (0.25, 0.5))])
def test_compiled_programs_stay_bounded(num_branches, buckets):
  model, variables, views, exit_logits, apply = _setup(num_branches)
  e = num_branches
  cascade = DynamicCascade(model, variables, [0.0] * (e - 1), buckets=buckets)
  bound = cascade.program_bound(N)
  b = len(cascade.bucket_sizes(N))  # segment k >= 2 depends on its bucket and the one before
  assert bound == 1 + b + (e - 2) * b * b
  rng = np.random.default_rng(0)
  compositions, trials = set(), []
  for trial in range(14):
    # New inputs half of the time, new thresholds every time.
    if trial % 2:
      batch = tuple(v[rng.permutation(N)] * rng.uniform(0.5, 1.5) for v in views)
      logits = np.stack([np.asarray(x) for x in apply(variables, batch)])
    else:
      batch, logits = views, exit_logits
    thresholds = [float(rng.uniform(0.3, 1.7)) for _ in range(e - 1)]
    cascade.thresholds = thresholds
    result = cascade.predict(batch)
    _check_against_policy(result, logits, thresholds, "entropy")
    compositions.add(tuple(result["counts"].tolist()))
    trials.append((batch, thresholds))
    assert cascade.num_compiled <= bound
  assert len(compositions) > 3  # many different remaining counts ...
  assert len(cascade.programs) == cascade.num_compiled <= bound  # ... few programs
  # Warm: replaying every composition compiles nothing new.
  before = cascade.num_compiled
  for batch, thresholds in trials:
    cascade.thresholds = thresholds
    cascade.predict(batch)
  assert cascade.num_compiled == before


def test_explicit_buckets_are_honoured():
  model, variables, views, exit_logits, _ = _setup(3)
  cascade = DynamicCascade(model, variables, [0.0, 0.0], buckets=(5, 11))
  assert cascade.bucket_sizes(N) == (5, 11, N) and cascade.program_bound(N) == 1 + 3 + 9
  padded_seen = set()
  for thresholds in _threshold_sets(exit_logits, "entropy"):
    cascade.thresholds = thresholds
    result = cascade.predict(views)
    _check_against_policy(result, exit_logits, thresholds, "entropy")
    for c, padded in zip(result["counts"][1:], result["padded_counts"][1:]):
      if c:
        assert padded == min(b for b in (5, 11, N) if b >= c)
        padded_seen.add(int(padded))
  assert len(padded_seen) > 1
  assert cascade.num_compiled <= 7


@pytest.mark.slow
def test_reuse_none_and_both_cascades():
  for reuse in ("none", "both"):
    model, variables, views, exit_logits, _ = _setup(3, reuse)
    t = _threshold_sets(exit_logits, "entropy")[0]
    result = DynamicCascade(model, variables, t).predict(views)
    _check_against_policy(result, exit_logits, t, "entropy")


def _padding_bound(count, min_bucket=8, max_padding=0.125):
  """What the default buckets promise (inference module docstring)."""
  return max(min_bucket, math.floor(count * (1 + max_padding)))


def test_buckets():
  assert default_buckets(100) == (8, 10, 12, 14, 16, 19, 22, 25, 29, 33, 38, 43, 49, 56,
                                  64, 73, 83, 94, 100)
  assert default_buckets(5) == (5,)
  assert default_buckets(40, min_bucket=5) == (5, 6, 7, 9, 11, 13, 15, 18, 21, 24, 28,
                                                32, 37, 40)
  assert default_buckets(1000, max_padding=1.0) == (8, 18, 38, 78, 158, 318, 638, 1000)
  # The sizes the docstring states.
  assert [len(default_buckets(n)) for n in (256, 1000, 1024, 2048)] == [27, 38, 38, 44]
  assert len(default_buckets(1000, max_padding=0.25)) == 21
  assert resolve_buckets(10, (0.25, 0.5)) == (3, 5, 10)
  assert resolve_buckets(10, (4, 12, 4)) == (4, 10)
  assert resolve_buckets(1000, (8, 16, 32, 64, 128, 256, 512)) == (8, 16, 32, 64, 128, 256,
                                                                    512, 1000)
  assert resolve_buckets(0) == ()
  with pytest.raises(ValueError, match="fraction"):
    resolve_buckets(10, (1.5,))
  with pytest.raises(ValueError, match="positive"):
    resolve_buckets(10, (0,))
  with pytest.raises(ValueError, match="max_padding"):
    default_buckets(10, max_padding=0.0)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 24, 100, 255, 256, 257, 512, 1000, 1024, 4099])
@pytest.mark.parametrize("max_padding", [0.125, 0.25, 1.0])
def test_default_buckets_bound_the_padding_at_every_count(n, max_padding):
  sizes = default_buckets(n, max_padding=max_padding)
  assert sizes[-1] == n and list(sizes) == sorted(set(sizes))
  counts = np.arange(1, n + 1)
  padded = np.asarray(sizes)[np.searchsorted(sizes, counts)]  # smallest bucket >= count
  bound = [min(n, _padding_bound(c, 8, max_padding)) for c in counts]
  assert np.all(padded >= counts) and np.all(padded <= bound)
  # The fewest sizes that keep the bound: dropping any size but n breaks it.
  for i in range(len(sizes) - 1):
    c = sizes[i - 1] + 1 if i else 1
    assert sizes[i + 1] > _padding_bound(c, 8, max_padding)


class _Toy(nn.Module):
  """A two-exit family small enough to compile every bucket: row i of x [B, 2]
  is segment 0's logits; segment 1 continues from the carry."""
  num_classes: int = 2
  num_exits: int = 2

  def setup(self):
    self.head = nn.Dense(2)

  def segment(self, k, x, carry=None):
    if k == 0:
      return x, x * 2.0
    return carry + self.head(carry), None

  def __call__(self, x):
    logits, carry = self.segment(0, x)
    return (logits, self.segment(1, x, carry)[0]), {}


@pytest.mark.parametrize("n", [256, 1000, 1024])
def test_padding_and_programs_measured_at_every_bucket(n):
  """Every bucket's edges as the count that goes on: the padded size stays within
  the bound, and each bucket compiles once (num_compiled reaches program_bound)."""
  model = _Toy()
  x = np.zeros((n, 2), np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  cascade = DynamicCascade(model, variables, [0.9], "max_prob")
  sizes = cascade.bucket_sizes(n)
  assert sizes == default_buckets(n)
  goes_on = sorted({c for b in sizes for c in (b, b + 1) if c <= n} | {1, 2, 3})
  confident = np.array([30.0, 0.0], np.float32)  # max prob ~1 > 0.9: exits at 0
  for c in goes_on:
    x = np.tile(confident, (n, 1))
    x[np.random.default_rng(c).choice(n, c, replace=False)] = 0.0  # these go on
    result = cascade.predict(x)
    assert result["counts"].tolist() == [n, c]
    assert c <= result["padded_counts"][1] <= min(n, _padding_bound(c))
    assert cascade.num_compiled <= cascade.program_bound(n)
  assert cascade.num_compiled == len(cascade.programs) == cascade.program_bound(n)
  assert cascade.program_bound(n) == 1 + len(sizes)


def test_rejects_bad_arguments():
  model, variables, views, _, _ = _setup(2)
  with pytest.raises(ValueError, match="thresholds for 2 exits"):
    DynamicCascade(model, variables, [0.5, 0.5])
  with pytest.raises(ValueError, match="criterion"):
    DynamicCascade(model, variables, [0.5], criterion="margin")
  cascade = DynamicCascade(model, variables, 0.5)  # a scalar for two exits is fine
  with pytest.raises(ValueError, match="one view per branch"):
    cascade.predict(views[:1])
  with pytest.raises(ValueError, match="batch sizes"):
    cascade.predict((views[0], views[1][:3]))
  empty = cascade.predict(tuple(v[:0] for v in views))
  assert empty["predictions"].shape == (0,) and empty["logits"].shape == (0, NUM_CLASSES)


# ----------------------------------------------------------------------------
# SingleDispatchCascade: the whole decision in one program (batch 1, small batches)


@functools.lru_cache(maxsize=None)
def _resnet_setup():
  import ml_collections
  from adaptive_vision import models
  from test_resnet import _abstract_variables, materialize
  model = models.build(ml_collections.ConfigDict(dict(
      name="resnet", depth=8, width=16, width_multiplier=0.25, num_classes=NUM_CLASSES,
      exits=(0, 1), exit_dropout=0.5, image_size=16, dtype="float32")))
  variables = materialize(_abstract_variables(model, image_size=16), seed=3)
  images = np.random.default_rng(5).normal(size=(N, 16, 16, 3)).astype(np.float32)
  apply = jax.jit(lambda v, x: model.apply(v, x)[0])
  exit_logits = np.stack([np.asarray(x) for x in apply(variables, images)])
  return model, variables, images, exit_logits, apply


@pytest.mark.parametrize("criterion", ["entropy", pytest.param("max_prob", marks=pytest.mark.slow)])
def test_dynamic_resnet_matches_policy(criterion):
  """The bucketed executor serves a ResNet through `segment`: same answers as
  the static policy, and the later stages take only the carry (no image rows)."""
  model, variables, images, exit_logits, _ = _resnet_setup()
  e = model.num_exits
  cascade = DynamicCascade(model, variables, [0.0] * (e - 1), criterion)
  on_device = DynamicCascade(model, variables, [0.0] * (e - 1), criterion)
  seen = set()
  for thresholds in _threshold_sets(exit_logits, criterion):
    cascade.thresholds = on_device.thresholds = thresholds
    result = cascade.predict(images)
    ref = full_cascade_predict(model, variables, images, thresholds, criterion)
    for key in ("exit_index", "predictions"):
      np.testing.assert_array_equal(result[key], ref[key])
    np.testing.assert_allclose(result["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    _check_against_policy(result, exit_logits, thresholds, criterion)
    device = on_device.predict(jnp.asarray(images))
    for key in ("exit_index", "predictions", "counts", "padded_counts"):
      np.testing.assert_array_equal(device[key], result[key])
    seen.update(result["exit_index"].tolist())
  assert seen == set(range(e))  # every exit was taken at some point
  for c in (cascade, on_device):
    assert c.num_compiled == len(c.programs) <= c.program_bound(N)
    for k, _, _, read, gather, _ in c.programs:
      assert (read, gather) == (((((16, 16, 3), "float32"),), (False,)) if k == 0 else ((), ()))


def _single(inputs, i):
  if isinstance(inputs, tuple):
    return tuple(v[i:i + 1] for v in inputs)
  return inputs[i:i + 1]


def _check_single_dispatch(model, variables, inputs, exit_logits, criterion, embed, decide):
  e = exit_logits.shape[0]
  cascade = SingleDispatchCascade(model, variables, [0.0] * (e - 1), criterion,
                                  embed_params=embed, backend=_backend(decide))
  assert (cascade.backend.decide is None) == (decide == "xla")
  seen = set()
  for thresholds in _threshold_sets(exit_logits, criterion):
    cascade.thresholds = thresholds
    ref = full_cascade_predict(model, variables, inputs, thresholds, criterion)
    whole = cascade.predict(inputs)  # a small batch: the same decisions
    for key in ("exit_index", "predictions"):
      np.testing.assert_array_equal(whole[key], ref[key])
    np.testing.assert_allclose(whole["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    for i in range(0, N, 3):  # batch 1
      one = cascade.predict(_single(inputs, i))
      assert one["exit_index"][0] == ref["exit_index"][i]
      assert one["predictions"][0] == ref["predictions"][i]
      np.testing.assert_allclose(one["logits"][0], ref["logits"][i], rtol=1e-5, atol=1e-5)
    _check_against_policy(dict(whole, counts=[(ref["exit_index"] >= k).sum() for k in range(e)],
                               padded_counts=np.full(e, N)), exit_logits, thresholds, criterion)
    seen.update(ref["exit_index"].tolist())
  assert seen == set(range(e))  # every exit was taken at some point
  assert cascade.num_compiled == 2  # one program per input shape (N and 1)


@pytest.mark.parametrize("decide", DECIDES_SLOW_NATIVE)
@pytest.mark.parametrize("num_branches,criterion", [(2, "entropy"),
                                                    pytest.param(3, "entropy", marks=pytest.mark.slow),
                                                    pytest.param(2, "max_prob",
                                                                 marks=pytest.mark.slow)])
def test_single_dispatch_ravit_matches_policy(num_branches, criterion, decide):
  model, variables, views, exit_logits, _ = _setup(num_branches)
  _check_single_dispatch(model, variables, views, exit_logits, criterion,
                         embed=num_branches == 2, decide=decide)


@pytest.mark.parametrize("decide", DECIDES_SLOW_NATIVE)
@pytest.mark.parametrize("criterion", ["entropy", pytest.param("max_prob", marks=pytest.mark.slow)])
def test_single_dispatch_resnet_matches_policy(criterion, decide):
  model, variables, images, exit_logits, _ = _resnet_setup()
  _check_single_dispatch(model, variables, images, exit_logits, criterion,
                         embed=criterion == "entropy", decide=decide)


@pytest.mark.parametrize("decide", DECIDES)
def test_single_dispatch_random_inputs_and_thresholds(decide):
  """Many random images and thresholds, one image per call, against the policy."""
  rng = np.random.default_rng(7)
  for model, variables, inputs, _, apply in (_setup(3), _resnet_setup()):
    cascade = SingleDispatchCascade(model, variables, [0.0] * (model.num_exits - 1),
                                    backend=_backend(decide))
    for trial in range(4):
      perm = rng.permutation(N)
      scale = rng.uniform(0.5, 1.5)
      batch = (tuple(v[perm] * scale for v in inputs) if isinstance(inputs, tuple)
               else inputs[perm] * scale)
      logits = np.stack([np.asarray(x) for x in apply(variables, batch)])
      ent = _scores(logits[:-1], "entropy")
      # Thresholds between two neighbouring scores, so float rounding cannot flip one.
      thresholds = [_mid_thresholds(ent[k], [rng.uniform(0.1, 0.9)])[0]
                    for k in range(model.num_exits - 1)]
      cascade.thresholds = thresholds
      ref = np.asarray(early_exit.exit_policy(logits, thresholds))
      got = [cascade.predict(_single(batch, i)) for i in range(N)]
      np.testing.assert_array_equal([g["exit_index"][0] for g in got], ref)
      np.testing.assert_array_equal([g["predictions"][0] for g in got],
                                    logits[ref, np.arange(N)].argmax(-1))


@pytest.mark.parametrize("decide", DECIDES)
def test_single_dispatch_skips_the_segments_nobody_needs(decide):
  """XLA keeps the later segments inside conditionals (not flattened into selects)."""
  model, variables, views, _, _ = _setup(3)
  hlo = jax.jit(cascade_program(model, decide=_backend(decide).decide)).lower(
      variables, _single(views, 0), jnp.zeros((2,))).compile().as_text()
  assert hlo.count(" conditional(") == 2
  assert hlo.count("av_exit_decide") == (3 if decide == "native" else 0)


# The decision kernel itself against decide_xla: tests/test_cpu_native.py.


def test_single_dispatch_one_exit_vit():
  from adaptive_vision.models import vit as vit_lib
  model = vit_lib.SingleExitViT(num_classes=NUM_CLASSES, width=16, depth=1, num_heads=2,
                                mlp_dim=32, patch_size=4, head_zero_init=False)
  images = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0][0])(variables, images))
  out = SingleDispatchCascade(model, variables, []).predict(images)
  np.testing.assert_array_equal(out["exit_index"], np.zeros(4))
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="thresholds for 1 exits"):
    SingleDispatchCascade(model, variables, [0.5])
