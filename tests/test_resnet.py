"""CIFAR ResNets with ERDE early exits: shapes, sizes, MACs vs XLA, BatchNorm, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adaptive_vision import flops, models
from adaptive_vision.models import resnet
from adaptive_vision.models.exit_heads import ExitHead, check_exits, exit_head_macs
from adaptive_vision.models.layers import BatchNorm

K = 10


def _cfg(**kw):
  base = dict(name="resnet", depth=20, width=16, width_multiplier=1.0, num_classes=K,
              exits=(), exit_dropout=0.5, image_size=32, dtype="float32")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract_variables(model, image_size=32, **kw):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kw), x)


def materialize(abstract, seed=0):
  """Concrete variables for the shapes `model.init` would give (traced with eval_shape).

  Tests use this instead of calling `init` for real: jit-compiling flax's
  random initializers (threefry) takes ~30s for a ResNet-8 on a small CPU.
  Kernels ~ N(0, 2/fan_in) (He), norm scales 1, biases 0, running stats (0, 1).
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract)


# ----------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("depth", [8, 20, 32])
def test_exit_and_block_shapes(depth):
  exits = resnet.stage_exits(depth)             # after stage 1 and stage 2
  model = models.build(_cfg(depth=depth, width_multiplier=0.25, exits=exits))
  images = jnp.ones((2, 32, 32, 3), jnp.float32)
  if depth == 8:   # one real forward pass; the deeper ones by shape inference only
    variables = materialize(_abstract_variables(model, train=False))
    logits, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  else:
    variables = _abstract_variables(model, train=False)
    logits, out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  n = (depth - 2) // 6
  assert len(logits) == len(exits) + 1 == 3
  assert all(l.shape == (2, K) and l.dtype == jnp.float32 for l in logits)
  assert len(out["blocks"]) == 3 * n
  widths = (4, 8, 16)
  for i, b in enumerate(out["blocks"]):
    s = 32 // 2 ** (i // n)
    assert b.shape == (2, s, s, widths[i // n]), (i, b.shape)
  assert out["pre_logits"].shape == (2, 16)
  # parameters: one exit head per listed block, then the final Dense
  params = variables["params"]
  assert sorted(k for k in params if k.startswith("exit")) == [f"exit_block{e}" for e in exits]
  assert params["head"]["kernel"].shape == (16, K)
  assert "proj_conv" in params[f"block{n}"] and "proj_conv" not in params["block0"]


@pytest.mark.parametrize("exits", [(0, 1), (1,), ()])
def test_segments_chain_to_the_whole_network_with_the_same_parameters(exits):
  """segment(k) runs exit k's share only; chained they give __call__'s logits,
  and the parameter tree is the one checkpoints hold (names and shapes)."""
  model = models.build(_cfg(depth=8, width_multiplier=0.25, exits=exits))
  variables = materialize(_abstract_variables(model))
  want = {"stem_conv", "stem_norm", "block0", "block1", "block2", "head"} | {
      f"exit_block{e}" for e in exits}
  assert set(variables["params"]) == want
  assert set(variables["batch_stats"]) == want - {"stem_conv", "head"}
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  logits, _ = model.apply(variables, images)
  assert model.num_exits == len(exits) + 1
  carry = None
  for k in range(model.num_exits):
    logits_k, carry = model.apply(variables, k, images, carry, method=resnet.ResNet.segment)
    np.testing.assert_allclose(logits_k, logits[k], rtol=1e-5, atol=1e-5)
  # Segment 0 holds only the stem and its blocks: fewer convolutions than the whole.
  count = lambda f: jax.jit(f).lower(variables, images).as_text().count("stablehlo.convolution")
  first = count(lambda v, x: model.apply(v, 0, x, method=resnet.ResNet.segment))
  whole = count(lambda v, x: model.apply(v, x))
  assert (first < whole) == bool(exits)
  with pytest.raises(ValueError, match="segment index"):
    model.apply(variables, model.num_exits, images, method=resnet.ResNet.segment)


def test_stage_exits_and_default_width():
  assert resnet.stage_exits(20) == (2, 5)
  assert resnet.stage_exits(8) == (0, 1)
  assert resnet.stage_exits(56) == (8, 17)
  assert resnet.stage_widths(16, 1.0) == (16, 32, 64)
  assert resnet.stage_widths(16, 0.25) == (4, 8, 16)


def test_bfloat16_compute_keeps_float32_logits_and_params():
  model = resnet.ResNet(depth=8, width_multiplier=0.25, exits=(0,), dtype=jnp.bfloat16)
  variables = _abstract_variables(model, train=False)
  logits, out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                               variables, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert all(l.dtype == jnp.float32 for l in logits)
  assert out["blocks"][0].dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables["params"]))


# ----------------------------------------------------------------------------
# sizes: published parameter counts and MACs


# Option B projections (1x1 conv + BN) at width 16: 16*32 + 32*64 conv weights
# and 2*(32+64) BN scales/biases; the published counts are for option A.
_PROJ_PARAMS = 16 * 32 + 32 * 64 + 2 * (32 + 64)
_PROJ_MACS = 16 * 16 * 16 * 32 + 8 * 8 * 32 * 64


@pytest.mark.parametrize("depth,published,option_a_exact", [
    (20, 0.27e6, 269_722),   # He et al. 2016 Table 6; exact count of the option-A reference
    (56, 0.85e6, 853_018),
])
def test_parameter_count_matches_published(depth, published, option_a_exact):
  variables = _abstract_variables(resnet.ResNet(depth=depth))
  n = _num_params(variables["params"])
  assert abs(n - published) / published < 0.03, n
  assert n - _PROJ_PARAMS == option_a_exact
  # running statistics are not parameters
  assert set(variables) == {"params", "batch_stats"}


def test_macs_match_published():
  plain20 = models.exit_macs(_cfg(depth=20))
  assert len(plain20) == 1
  assert abs(plain20[0] - 40.8e6) / 40.8e6 < 0.02, plain20      # published ~40.8M
  plain56 = models.exit_macs(_cfg(depth=56))
  # 125.49M is the widely quoted (option A) ResNet-56 count
  assert abs(plain56[0] - _PROJ_MACS - 125.49e6) / 125.49e6 < 1e-3, plain56


def test_exit_macs_are_cumulative_with_earlier_heads():
  cfg = _cfg(depth=20, exits=(2, 5))
  macs = models.exit_macs(cfg)
  b = resnet.macs_breakdown(image_size=32, depth=20, exits=(2, 5))
  assert len(macs) == 3 and np.all(np.diff(macs) > 0)
  heads = [exit_head_macs(32, 32, 16, K), exit_head_macs(16, 16, 32, K)]
  assert b["exit_heads"] == heads == [16 * 16 * 16 * K, 8 * 8 * 32 * K]
  stem, blocks = b["stem"], b["blocks"]
  assert stem == 32 * 32 * 9 * 3 * 16
  assert macs[0] == stem + sum(blocks[:3]) + heads[0]
  assert macs[1] == stem + sum(blocks[:6]) + heads[0] + heads[1]
  plain = models.exit_macs(_cfg(depth=20))[0]
  assert macs[2] == plain + sum(heads)              # final = backbone + head + early heads
  assert b["head"] == 64 * K


# ----------------------------------------------------------------------------
# MACs vs XLA
#
# Two conventions differ between `exit_macs` and XLA's cost analysis:
#  1. XLA counts only the convolution taps that read the input, not those
#     over the zero padding (checked exactly below on single convolutions);
#     `exit_macs` follows the published convention (padded taps count: a
#     ResNet-20 is 40.8M). At 8x8, a 3x3 conv loses (22/24)^2 = 16% of its
#     taps, so 2*exit_macs is ~7% above XLA for ResNet-20. We compare XLA
#     with `macs_breakdown(count_padding=False)`, the same walk over the
#     architecture with padded taps excluded.
#  2. XLA also counts the elementwise work, which in these narrow CNNs is
#     ~2-3% of the total at width 16 (a 3x3 conv with 16 inputs is 288 FLOPs
#     per output; BN+ReLU+add are 5). 2% therefore cannot hold for MACs
#     alone; `_non_mac_flops` counts it as XLA does (checked per op below).


@pytest.mark.parametrize("size,kernel,stride,pad", [
    (32, 3, 1, 1), (32, 3, 2, 1), (15, 3, 2, 1), (8, 1, 2, 0), (5, 3, 1, 1)])
def test_conv_valid_macs_equal_xla_exactly(size, kernel, stride, pad):
  x = jnp.zeros((1, size, size, 8))
  k = jnp.zeros((kernel, kernel, 8, 16))
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got = flops.xla_flops(conv, x, k)
  assert got == 2 * flops.conv_valid_macs(size, size, kernel, stride, pad, 8, 16)
  out = flops.conv_out_size(size, kernel, stride, pad, pad)
  assert got <= 2 * flops.conv_macs(out, out, kernel, 8, 16)


def test_elementwise_flop_counts_per_op():
  """The per-element costs `_non_mac_flops` assumes, measured on single ops."""
  import flax.linen as nn
  x = jnp.ones((1, 8, 8, 16))
  e = x.size
  bn = nn.BatchNorm(use_running_average=True)
  v = bn.init(jax.random.key(0), x)
  bn_flops = flops.xla_flops(lambda v, x: bn.apply(v, x), v, x)
  assert 3 * e <= bn_flops <= 3 * e + 8 * 16            # (x-mean)*mul+bias, + per channel
  assert flops.xla_flops(nn.relu, x) == e
  assert flops.xla_flops(lambda x: nn.avg_pool(x, (2, 2), (2, 2)), x) == e
  assert flops.xla_flops(lambda x: x.mean(axis=(1, 2)), x) == e


def _non_mac_flops(*, image_size, depth, width_multiplier, exits):
  """Cumulative elementwise FLOPs per exit, counted as XLA counts them (eval mode).

  Per output element: BatchNorm 3 ((x-mean)*mul+bias), ReLU 1, residual add 1;
  exit head: BN+ReLU 4 + avg-pool 1 per input element + the Dense bias;
  final head: global mean 1 per element + one division per channel + bias.
  Per-channel work inside BN (rsqrt, scale) is left out (<0.01%).
  """
  n = resnet.blocks_per_stage(depth)
  widths = resnet.stage_widths(16, width_multiplier)
  h, c = image_size, widths[0]
  total = 4 * h * h * c                                  # stem BN + ReLU
  result = []
  for i in range(3 * n):
    stride = 2 if i % n == 0 and i > 0 else 1
    cout = widths[i // n]
    h = (h - 1) // stride + 1
    e = h * h * cout
    total += 4 * e + 5 * e + (3 * e if (stride != 1 or cout != c) else 0)
    c = cout
    if i in exits:
      total += 5 * e + K
      result.append(total)
  return result + [total + h * h * c + c + K]


def _exit_fns(model):
  # Exit j with the heads of exits 0..j: what an early-exit inference that
  # stops at exit j computes; XLA may (and must) drop everything else.
  return [lambda v, x, j=j: model.apply(v, x, train=False)[0][:j + 1]
          for j in range(len(model.exits) + 1)]


def _expected_xla(depth, width_multiplier, exits, image_size=32):
  valid = resnet.macs_breakdown(image_size=image_size, depth=depth,
                                width_multiplier=width_multiplier, num_classes=K,
                                exits=exits, count_padding=False)
  macs = resnet.cumulative_exit_macs(valid, exits)
  other = _non_mac_flops(image_size=image_size, depth=depth,
                         width_multiplier=width_multiplier, exits=exits)
  return [2 * m + o for m, o in zip(macs, other)]


def test_exit_macs_agree_with_compiled_xla_and_dead_code_is_eliminated():
  depth, exits = 20, (2, 5)
  cfg = _cfg(depth=depth, exits=exits)
  model = models.build(cfg)
  x = jnp.zeros((1, 32, 32, 3))
  variables = _abstract_variables(model)
  got = [flops.xla_flops(f, variables, x) for f in _exit_fns(model)]
  expected = _expected_xla(depth, 1.0, exits)
  for g, e in zip(got, expected):
    # Measured: +0.7-0.8%; the residual is XLA:CPU duplicating cheap
    # elementwise producers (a block's BN+add+ReLU) into each consumer fusion.
    assert abs(g / e - 1) < 0.02, (got, expected)
  # Dead code elimination: the exit-0 program does only the first 3 blocks
  # (~38% of the network), not the whole network.
  assert got[0] < 0.45 * got[-1] and got[1] < 0.75 * got[-1], got
  # exit_macs (padded taps) vs the XLA convention: only the padding differs.
  published = models.exit_macs(cfg)
  valid = resnet.cumulative_exit_macs(
      resnet.macs_breakdown(image_size=32, depth=depth, exits=exits, count_padding=False), exits)
  assert all(0.9 < v / p < 1.0 for v, p in zip(valid, published))


@pytest.mark.parametrize("depth,width_multiplier,exits", [(20, 1.0, (2, 5)), (8, 0.25, (0, 1))])
def test_exit_macs_agree_with_unfused_xla_cost_analysis(depth, width_multiplier, exits):
  """Before fusion (jax already drops dead code when lowering), XLA's count is exact."""
  model = resnet.ResNet(depth=depth, width_multiplier=width_multiplier, num_classes=K, exits=exits)
  x = jnp.zeros((1, 32, 32, 3))
  variables = _abstract_variables(model)
  got = [jax.jit(f).lower(variables, x).cost_analysis()["flops"] for f in _exit_fns(model)]
  expected = _expected_xla(depth, width_multiplier, exits)
  for g, e in zip(got, expected):
    assert abs(g / e - 1) < 1e-3, (got, expected)     # measured <= 1e-4 (per-channel ops)


# ----------------------------------------------------------------------------
# BatchNorm and dropout


@pytest.fixture(scope="module")
def small():
  model = resnet.ResNet(depth=8, width_multiplier=0.25, num_classes=K, exits=(0, 1))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = materialize(_abstract_variables(model, image_size=16, train=False))
  # jit: op-by-op dispatch of a whole ResNet is slow on a small CPU
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  return model, apply, variables, images


def test_batch_stats_update_in_train_mode_only(small):
  model, apply, variables, images = small
  _, new = apply(variables, images, train=True, mutable=("batch_stats",),
                 rngs={"dropout": jax.random.key(2)})
  old_leaves = jax.tree_util.tree_leaves(variables["batch_stats"])
  new_leaves = jax.tree_util.tree_leaves(new["batch_stats"])
  assert len(old_leaves) == len(new_leaves) > 0
  assert all(not np.allclose(a, b) for a, b in zip(old_leaves, new_leaves))
  # momentum 0.9: new running mean = 0.9 * old (=0) + 0.1 * batch mean
  stem_mean = new["batch_stats"]["stem_norm"]["mean"]
  conv = jax.lax.conv_general_dilated(images, variables["params"]["stem_conv"]["kernel"],
                                      (1, 1), [(1, 1), (1, 1)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(stem_mean, 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)

  _, same = apply(variables, images, train=False, mutable=("batch_stats",))
  jax.tree_util.tree_map(np.testing.assert_array_equal, same["batch_stats"],
                         variables["batch_stats"])


def test_eval_is_deterministic_and_train_uses_dropout_rng(small):
  model, apply, variables, images = small
  e1, _ = apply(variables, images, train=False, rngs={"dropout": jax.random.key(3)})
  e2, _ = apply(variables, images, train=False, rngs={"dropout": jax.random.key(4)})
  e3, _ = apply(variables, images, train=False)        # no rng needed in eval
  for a, b, c in zip(e1, e2, e3):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)

  def train(seed):
    return apply(variables, images, train=True, mutable=("batch_stats",),
                 rngs={"dropout": jax.random.key(seed)})[0][0]
  t1, t2, t1_again = train(5), train(6), train(5)
  for j in range(2):      # the early exits have dropout 0.5
    assert not np.allclose(t1[j], t2[j])
    np.testing.assert_array_equal(t1[j], t1_again[j])
  np.testing.assert_allclose(t1[2], t2[2], rtol=1e-6)  # the final head has none
  # train mode (batch statistics) differs from eval mode (running averages)
  assert not np.allclose(t1[2], e1[2])


# ----------------------------------------------------------------------------
# exit heads


@pytest.mark.parametrize("h,w,pooled", [(8, 8, 16), (5, 7, 6), (1, 1, 1), (1, 4, 2), (2, 2, 1)])
def test_exit_head_pooling_and_macs(h, w, pooled):
  head = ExitHead(num_classes=3)
  x = jnp.arange(2 * h * w * 4, dtype=jnp.float32).reshape(2, h, w, 4)
  v = materialize(jax.eval_shape(lambda x: head.init(jax.random.key(0), x, train=False), x))
  kernel = v["params"]["dense"]["kernel"]
  assert kernel.shape == (pooled * 4, 3)
  assert exit_head_macs(h, w, 4, 3) == kernel.size
  y = jax.jit(lambda v, x: head.apply(v, x, train=False))(v, x)
  # eval mode with (mean 0, var 1) stats, scale 1, bias 0: BN is ~identity and
  # the inputs are >= 0, so the head is Dense(avg-pool(x)) with floor pooling
  ph, pw = (h // 2 or 1), (w // 2 or 1)
  wh, ww = h // ph, w // pw
  pooled_x = x[:, :ph * wh, :pw * ww].reshape(2, ph, wh, pw, ww, 4).mean(axis=(2, 4))
  np.testing.assert_allclose(y, pooled_x.reshape(2, -1) @ kernel, rtol=1e-4, atol=1e-6)
  assert y.shape == (2, 3) and y.dtype == jnp.float32


class _ExitHeadAsBefore(nn.Module):
  """The exit head written with flax's own Dense (its variables' reference)."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(x, relu=True)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(10, name="dense")(x.reshape(x.shape[0], -1))


def _cpu_head_kernel():
  from adaptive_vision.cpu.native import head as native_head
  return native_head.exit_head


@pytest.mark.parametrize("kernel", ["plain", pytest.param("cpu", marks=pytest.mark.requires("native"))])
def test_exit_head_keeps_flax_dense_variables_and_values(kernel):
  """Same variables (names, shapes, initial values) as BatchNorm -> nn.Dense, so
  checkpoints restore; a backend's fused inference kernel and the plain ops
  agree in eval mode, and training (with dropout) is the same computation."""
  from adaptive_vision.models.layers import Layers
  layers = Layers(exit_head_kernel=_cpu_head_kernel() if kernel == "cpu" else None)
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 16))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(2)}
  head = ExitHead(10, layers=layers)
  v = head.init(rngs, x, train=False)
  ref = _ExitHeadAsBefore().init(rngs, x, train=False)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(ref)
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)
  # trained-looking statistics, so eval mode is not the identity
  v = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.uniform(jax.random.key(3), a.shape),
                             v)
  f = jax.jit(lambda v, x: head.apply(v, x, train=False))
  np.testing.assert_allclose(f(v, x), _ExitHeadAsBefore().apply(v, x, train=False),
                             rtol=1e-5, atol=1e-5)
  assert ("av_exit_head" in f.lower(v, x).as_text()) == (kernel == "cpu")
  y, _ = head.apply(v, x, train=True, rngs={"dropout": jax.random.key(4)}, mutable=["batch_stats"])
  y_ref, _ = _ExitHeadAsBefore().apply(v, x, train=True, rngs={"dropout": jax.random.key(4)},
                                       mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("exits,match", [
    ((5, 2), "strictly increasing"),
    ((2, 2), "strictly increasing"),
    ((-1,), "out of range"),
    ((9,), "out of range"),
    ((8,), "last block"),
    ((1.5,), "integers"),
    ((True,), "integers"),
    ("25", "sequence"),
])
def test_bad_exits_raise(exits, match):
  with pytest.raises(ValueError, match=match):
    models.build(_cfg(depth=20, exits=exits))
  with pytest.raises(ValueError, match=match):
    resnet.macs_breakdown(image_size=32, depth=20, exits=exits)
  with pytest.raises(ValueError, match=match):
    resnet.ResNet(depth=20, exits=exits).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_check_exits_accepts_valid_and_empty():
  assert check_exits([0, np.int64(3)], 5) == (0, 3)
  assert check_exits((), 5) == ()
  assert check_exits(None, 5) == ()


def test_bad_config_raises():
  with pytest.raises(ValueError, match="unknown ResNet config keys.*'widht'"):
    models.build(_cfg(widht=32))
  with pytest.raises(ValueError, match="unknown ResNet config keys"):
    models.exit_macs(_cfg(variant="Ti/16"))
  with pytest.raises(ValueError, match="6n\\+2"):
    models.build(_cfg(depth=18))
  with pytest.raises(ValueError, match="positive"):
    models.build(_cfg(width_multiplier=0.0))
  cfg = _cfg()
  del cfg["image_size"]
  models.build(cfg)                                   # building needs no resolution
  with pytest.raises(ValueError, match="image_size"):
    models.exit_macs(cfg)
