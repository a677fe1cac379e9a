"""ViT with early exits: shapes, parameter sharing with ViT, MACs vs XLA, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adaptive_vision import flops, models
from adaptive_vision.models import ee_vit, vit
from adaptive_vision.models.exit_heads import token_exit_head_macs

K = 10
TINY = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=4)


def _cfg(**kw):
  base = dict(name="ee_vit", num_classes=K, image_size=16, exits=(0, 1), **TINY)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _abstract_variables(model, image_size):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def materialize(abstract, seed=0):
  """Concrete variables for `init`'s shapes without compiling the random
  initializers (slow on a small CPU): weights ~ N(0, 1/fan_in), norm scales 1,
  biases 0, embeddings ~ N(0, 0.02)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name in ("pos_embedding", "cls"):
      return jnp.asarray(rng.normal(0, 0.02, leaf.shape), leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return jnp.asarray(rng.normal(0, np.sqrt(1 / fan_in), leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def tiny():
  model = models.build(_cfg(dropout=0.1))
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = materialize(_abstract_variables(model, 16))
  apply = jax.jit(model.apply, static_argnames=("train",))
  return model, apply, variables, images


def test_shapes_and_outputs(tiny):
  model, apply, variables, images = tiny
  logits, out = apply(variables, images, train=False)
  assert isinstance(model, ee_vit.EarlyExitViT) and model.exits == (0, 1)
  assert len(logits) == 3
  assert all(l.shape == (2, K) and l.dtype == jnp.float32 for l in logits)
  assert len(out["blocks"]) == 3 and all(b.shape == (2, 17, 32) for b in out["blocks"])
  assert out["pre_logits"].shape == (2, 32)
  # exits read the class token of their block: LayerNorm + Dense by hand
  p = variables["params"]["exit_block1"]
  cls = out["blocks"][1][:, 0]
  normed = (cls - cls.mean(-1, keepdims=True)) / jnp.sqrt(cls.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(logits[1], normed @ p["dense"]["kernel"] + p["dense"]["bias"],
                             rtol=1e-4, atol=1e-5)
  # the last exit is the ViT's own head on the ViT's own parameters
  plain = vit.ViT(num_classes=K, **TINY, dropout=0.1)
  vit_params = {k: v for k, v in variables["params"].items() if not k.startswith("exit_")}
  vit_logits, _ = jax.jit(lambda v, x: plain.apply(v, x, train=False))({"params": vit_params}, images)
  np.testing.assert_allclose(logits[-1], vit_logits, rtol=1e-5, atol=1e-6)


def test_parameter_tree_is_vit_plus_exit_heads():
  model = models.build(_cfg())
  params = _abstract_variables(model, 16)["params"]
  plain = _abstract_variables(vit.ViT(num_classes=K, **TINY), 16)["params"]
  assert set(params) == set(plain) | {"exit_block0", "exit_block1"}
  heads = {k: jax.tree_util.tree_map(lambda x: x.shape, params[k]) for k in ("exit_block0",)}
  assert heads["exit_block0"] == {"norm": {"scale": (32,), "bias": (32,)},
                                  "dense": {"kernel": (32, K), "bias": (K,)}}


def test_variant_string_and_shapes_by_inference():
  model = models.build(_cfg(width=None, depth=None, num_heads=None, mlp_dim=None,
                            patch_size=None, variant="Nano/8", image_size=32, exits=(1, 2)))
  variables = _abstract_variables(model, 32)
  logits, out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                               jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert [l.shape for l in logits] == [(2, K)] * 3
  assert len(out["blocks"]) == 4 and out["blocks"][0].shape == (2, 17, 96)


def test_eval_deterministic_train_uses_dropout_rng(tiny):
  model, apply, variables, images = tiny
  e1, _ = apply(variables, images, train=False, rngs={"dropout": jax.random.key(3)})
  e2, _ = apply(variables, images, train=False, rngs={"dropout": jax.random.key(4)})
  for a, b in zip(e1, e2):
    np.testing.assert_array_equal(a, b)
  t1, _ = apply(variables, images, train=True, rngs={"dropout": jax.random.key(5)})
  t2, _ = apply(variables, images, train=True, rngs={"dropout": jax.random.key(6)})
  for a, b in zip(t1, t2):
    assert not np.allclose(a, b)


def test_exit_macs_cumulative():
  macs = models.exit_macs(_cfg())
  common = dict(image_size=16, patch_size=4, width=32, mlp_dim=64, num_classes=K)
  head = token_exit_head_macs(32, K)
  assert head == 32 * K
  assert macs[0] == flops.vit_macs(depth=1, head=False, **common) + head
  assert macs[1] == flops.vit_macs(depth=2, head=False, **common) + 2 * head
  # final: the whole ViT + both early heads
  assert macs[2] == flops.vit_macs(depth=3, **common) + 2 * head
  plain_vit = ml_collections.ConfigDict(dict(name="vit", num_classes=K, image_size=16, **TINY))
  assert macs[2] == models.exit_macs(plain_vit)[0] + 2 * head
  assert np.all(np.diff(macs) > 0)


def test_exit_macs_agree_with_xla():
  # Width 192 (Ti-sized blocks, 4 of them, 17 tokens): non-MAC work (LayerNorm,
  # GELU, softmax, residual adds; not counted in MACs) is ~1.2-1.4% of XLA's
  # FLOPs here, so 2% holds. At width 32 it is ~8% (a GELU costs as many FLOPs
  # as a 4-wide dot product), which is why this check is not done on TINY.
  cfg = _cfg(width=192, depth=4, num_heads=3, mlp_dim=768, patch_size=8, image_size=32,
             exits=(0, 2))
  model = models.build(cfg)
  macs = models.exit_macs(cfg)
  variables = _abstract_variables(model, 32)
  x = jnp.zeros((1, 32, 32, 3))
  got = [flops.xla_flops(lambda v, x, j=j: model.apply(v, x, train=False)[0][:j + 1],
                         variables, x) for j in range(3)]
  for g, m in zip(got, macs):
    assert 0 <= g / (2 * m) - 1 < 0.02, (got, macs)     # XLA counts MACs + a bit more
  # dead code elimination: exit 0 runs 1 of the 4 blocks
  assert got[0] < 0.3 * got[-1], got


@pytest.mark.parametrize("exits,match", [
    ((1, 0), "strictly increasing"),
    ((2,), "last block"),
    ((3,), "out of range"),
    ((-1,), "out of range"),
    (("1",), "integers"),
])
def test_bad_exits_raise(exits, match):
  with pytest.raises(ValueError, match=match):
    models.build(_cfg(exits=exits))
  with pytest.raises(ValueError, match=match):
    models.exit_macs(_cfg(exits=exits))
  with pytest.raises(ValueError, match=match):
    ee_vit.EarlyExitViT(num_classes=K, exits=exits, **TINY).init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_bad_config_raises():
  with pytest.raises(ValueError, match="unknown EarlyExitViT config keys.*'exit_dropout'"):
    models.build(_cfg(exit_dropout=0.5))
  with pytest.raises(ValueError, match="not divisible by patch size"):
    models.build(_cfg(image_size=18))
  with pytest.raises(ValueError, match="unknown ViT variant"):
    models.build(_cfg(variant="Q/4"))
  assert models.build(_cfg(exits=())).exits == ()
  assert len(models.exit_macs(_cfg(exits=()))) == 1
