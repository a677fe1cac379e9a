"""ViT: variants, shapes, published sizes, analytic MACs against XLA."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from adaptive_vision import flops, models
from adaptive_vision.models import vit


def _cfg(**kw):
  return mlc.ConfigDict(dict(dict(name="vit", num_classes=10, image_size=32), **kw))


def test_decode_variant_and_overrides():
  assert vit.decode_variant("Ti/16") == dict(width=192, depth=12, num_heads=3,
                                             mlp_dim=768, patch_size=16)
  assert vit.decode_variant("S/4", depth=6)["depth"] == 6
  with pytest.raises(ValueError, match="unknown ViT variant"):
    vit.decode_variant("Q/16")
  with pytest.raises(ValueError, match="needs"):
    vit.decode_variant(None, width=64)


@pytest.mark.parametrize("variant,params_m,gmacs", [
    ("Ti/16", 5.7, 1.26), ("S/16", 22.0, 4.6), ("B/16", 86.6, 17.6)])
def test_published_sizes(variant, params_m, gmacs):
  cfg = mlc.ConfigDict(dict(name="vit", variant=variant, num_classes=1000, image_size=224))
  model = models.build(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  n = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
  assert n / 1e6 == pytest.approx(params_m, rel=0.02)
  assert models.exit_macs(cfg)[0] / 1e9 == pytest.approx(gmacs, rel=0.02)


def test_outputs_and_pooling():
  model = models.build(_cfg(variant="Nano/4", pool="gap"))
  x = jnp.ones((3, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  (logits,), out = model.apply(variables, x)  # the family returns a tuple of exits
  assert logits.shape == (3, 10)
  assert len(out["blocks"]) == 4 and out["blocks"][0].shape == (3, 65, 96)
  assert out["pre_logits"].shape == (3, 96) and out["cls_token"].shape == (3, 96)
  np.testing.assert_allclose(out["pre_logits"], out["encoded"][:, 1:].mean(1), rtol=1e-5)


def test_family_returns_one_exit_tuple_with_the_vit_parameters():
  """models.build gives a tuple of exits like every family; vit.ViT itself keeps
  (logits, out) and the same parameters, so checkpoints load either way."""
  cfg = _cfg(variant="Nano/4", head_zero_init=False)
  model, plain = models.build(cfg), vit.ViT(num_classes=10, variant="Nano/4",
                                            head_zero_init=False)
  assert isinstance(model, vit.ViT)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables,
                      plain.init(jax.random.PRNGKey(0), x))
  assert all(jax.tree.leaves(same))
  exits, out = model.apply(variables, x)
  logits, plain_out = plain.apply(variables, x)
  assert isinstance(exits, tuple) and len(exits) == 1
  np.testing.assert_array_equal(exits[0], logits)
  np.testing.assert_array_equal(out["pre_logits"], plain_out["pre_logits"])


def test_cls_bias_changes_output_and_dropout_needs_train():
  model = vit.ViT(num_classes=4, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                  head_zero_init=False, dropout=0.5, stochastic_depth=0.5)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  a, _ = model.apply(variables, x)
  # (a constant vector would vanish in LayerNorm, so use a random one)
  b, _ = model.apply(variables, x, cls_bias=jax.random.normal(jax.random.PRNGKey(4), (2, 32)))
  assert not np.allclose(a, b)
  c, _ = model.apply(variables, x)  # eval mode is deterministic
  np.testing.assert_array_equal(a, c)
  t1, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  t2, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(t1, t2)


def test_analytic_flops_match_xla():
  cfg = mlc.ConfigDict(dict(name="vit", variant="Ti/16", num_classes=1000, image_size=224))
  model = models.build(cfg)
  x = jnp.zeros((1, 224, 224, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  xla = flops.xla_flops(lambda v, x: model.apply(v, x)[0][0], variables, x)
  analytic = flops.macs_to_flops(models.exit_macs(cfg)[0])
  assert abs(xla - analytic) / analytic < 0.02


def test_posemb_resampling_runs_at_new_resolution():
  model = models.build(_cfg(variant="Nano/4"))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  params = vit.resample_params(variables["params"], 64, 4)
  assert params["pos_embedding"].shape == (1, 256, 96)
  (logits,), _ = model.apply({"params": params}, jnp.zeros((2, 64, 64, 3)))
  assert logits.shape == (2, 10)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="not divisible by patch size"):
    models.build(_cfg(variant="Ti/16", image_size=40))
  with pytest.raises(ValueError, match="unknown ViT config keys"):
    models.build(_cfg(variant="Ti/16", widht=3))
  with pytest.raises(ValueError, match="unknown model.name") as e:
    models.build(mlc.ConfigDict(dict(name="vitt", num_classes=10)))
  # The families only, not the layer modules beside them.
  assert models.available() == ["ee_vit", "ravit", "resnet", "vit"]
  assert "'ravit'" in str(e.value) and "'conv'" not in str(e.value)


def test_attention_implementations_share_parameters_and_results():
  """'xla' (heads-first einsums, the CPU backend's choice) and 'fused'
  (jax.nn.dot_product_attention, the plain default) are the same function of
  the same parameters, so checkpoints move between them and between CPU and
  accelerators."""
  from adaptive_vision.models.layers import Layers
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  mk = lambda impl: vit.ViT(num_classes=10, variant="Nano/4", layers=Layers(attention=impl),
                            head_zero_init=False)
  params = mk("xla").init(jax.random.key(0), x)
  fused_params = mk("fused").init(jax.random.key(0), x)
  same = jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)),
                      params, fused_params)
  assert all(jax.tree.leaves(same))
  out = {impl: mk(impl).apply(params, x)[0] for impl in ("xla", "fused")}
  np.testing.assert_allclose(out["xla"], out["fused"], rtol=1e-5, atol=1e-5)
  grads = {impl: jax.grad(lambda p: mk(impl).apply(p, x)[0].sum())(params)
           for impl in ("xla", "fused")}
  for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["fused"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
