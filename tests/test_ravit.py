"""RAViT: shapes, per-branch execution, reuse, stop-gradient, MACs, validation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adaptive_vision import flops, models
from adaptive_vision.models import ravit
from adaptive_vision.models.ravit import RAViT

NUM_CLASSES = 5
# The fast loop keeps the richest and the emptiest reuse; CI runs them all.
_SLOW = pytest.mark.slow


def _branch(resolution, width=16, **kw):
  b = dict(resolution=resolution, width=width, depth=1, num_heads=2, mlp_dim=32,
           patch_size=4, head_zero_init=False)
  b.update(kw)
  return b


def _branches(resolutions, widths=None):
  widths = widths or [16] * len(resolutions)
  return tuple(_branch(r, w) for r, w in zip(resolutions, widths))


def _views(resolutions, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, r, r, 3)), jnp.float32)
               for r in resolutions)


def _init(model, views, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), views)


def _apply(model, variables, views, **kw):
  """Jitted full call (eager dispatch of every op is slow on a shared CPU)."""
  return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, views)


@pytest.mark.parametrize("resolutions,widths", [
    ((8, 16), (16, 24)), pytest.param((8, 16, 32), (16, 24, 16), marks=_SLOW)])
def test_output_shapes(resolutions, widths):
  model = RAViT(branches=_branches(resolutions, widths), num_classes=NUM_CLASSES)
  views = _views(resolutions, batch=3)
  variables = _init(model, views)
  exit_logits, out = _apply(model, variables, views)
  assert isinstance(exit_logits, tuple) and len(exit_logits) == len(resolutions)
  for lg in exit_logits:
    assert lg.shape == (3, NUM_CLASSES)
    assert np.all(np.isfinite(lg))
  assert len(out["branches"]) == len(resolutions)
  for o, w in zip(out["branches"], widths):
    assert o["cls_token"].shape == (3, w)
  assert model.resolutions == resolutions and model.num_exits == len(resolutions)
  assert models.as_exits(exit_logits) == exit_logits


@pytest.mark.parametrize("reuse", [pytest.param(r, marks=_SLOW) for r in ("token", "logits", "both", "patch")]
                         + [pytest.param("none", marks=_SLOW), "token+patch"])
def test_branchwise_equals_full_call(reuse):
  res = (8, 16, 32)
  model = RAViT(branches=_branches(res, (16, 24, 16)), num_classes=NUM_CLASSES, reuse=reuse)
  views = _views(res)
  variables = _init(model, views)
  full, _ = _apply(model, variables, views)
  # One branch per program, each handed the previous branch's outputs.
  step = jax.jit(lambda v, k, x, p: model.apply(v, k, x, p, method=RAViT.branch),
                 static_argnums=1)
  prev = None
  for k, view in enumerate(views):
    lg, prev = step(variables, k, view, prev)
    np.testing.assert_allclose(np.asarray(lg), np.asarray(full[k]), rtol=1e-5, atol=1e-6)


def test_parameter_names_shared_by_call_and_branch():
  res = (8, 16)
  model = RAViT(branches=_branches(res), num_classes=NUM_CLASSES)
  views = _views(res)
  params = _init(model, views)["params"]
  assert set(params) == {"branch0", "branch1", "reuse_norm1", "reuse_token1"}
  # Initializing through the per-branch method creates the same names/shapes.
  p0 = jax.eval_shape(lambda: model.init(jax.random.key(0), 0, views[0],
                                         method=RAViT.branch))["params"]
  assert set(p0) == {"branch0"}
  assert (jax.tree_util.tree_structure(p0["branch0"])
          == jax.tree_util.tree_structure(params["branch0"]))
  assert (jax.tree.map(jnp.shape, p0["branch0"])
          == jax.tree.map(jnp.shape, params["branch0"]))


def _perturb(tree, seed, scale=0.5):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("reuse,changes", [
    pytest.param(r, True, marks=_SLOW) for r in ("token", "logits", "both", "patch")]
    + [("none", False), ("token+logits+patch", True)])
def test_reuse_links_branches(reuse, changes):
  res = (8, 16)
  model = RAViT(branches=_branches(res), num_classes=NUM_CLASSES, reuse=reuse)
  views = _views(res)
  variables = _init(model, views)
  (l0, l1), _ = _apply(model, variables, views)

  # 1) perturb branch 0's parameters.
  params = dict(variables["params"])
  params["branch0"] = _perturb(params["branch0"], seed=1)
  (p0, p1), _ = _apply(model, {"params": params}, views)
  assert not np.allclose(p0, l0)  # branch 0 itself did change
  # 2) perturb branch 0's input view only.
  views2 = (views[0] + 1.0,) + views[1:]
  (q0, q1), _ = _apply(model, variables, views2)
  assert not np.allclose(q0, l0)
  if changes:
    assert np.max(np.abs(p1 - l1)) > 1e-4
    assert np.max(np.abs(q1 - l1)) > 1e-4
  else:
    np.testing.assert_array_equal(np.asarray(p1), np.asarray(l1))
    np.testing.assert_array_equal(np.asarray(q1), np.asarray(l1))


@pytest.mark.parametrize("reuse", [pytest.param(r, marks=_SLOW) for r in ("token", "both")]
                         + ["token+patch"])
def test_stop_gradient_reuse(reuse):
  res = (8, 16)
  views = _views(res)
  labels = jnp.array([1, 3])
  grads = {}
  for stop in (False, True):
    model = RAViT(branches=_branches(res), num_classes=NUM_CLASSES, reuse=reuse,
                  stop_gradient_reuse=stop)
    variables = _init(model, views)

    def branch2_loss(params):
      (_, l1), _ = model.apply({"params": params}, views)
      logp = jax.nn.log_softmax(l1)
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    g = jax.jit(jax.grad(branch2_loss))(variables["params"])
    grads[stop] = g
    norm0 = float(optax_global_norm(g["branch0"]))
    if stop:
      assert norm0 == 0.0
    else:
      assert norm0 > 0.0
    # The reuse projection and branch 1 are trained either way.
    assert float(optax_global_norm(g["reuse_token1"])) > 0.0
    assert float(optax_global_norm(g["branch1"])) > 0.0
  # Stop-gradient leaves the forward pass and branch-1 gradients alone.
  np.testing.assert_allclose(
      np.asarray(grads[True]["branch1"]["head"]["kernel"]),
      np.asarray(grads[False]["branch1"]["head"]["kernel"]), rtol=1e-6, atol=1e-7)


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def _cfg(branches, reuse="token", **kw):
  return ml_collections.ConfigDict(dict(name="ravit", num_classes=10, reuse=reuse,
                                        branches=[dict(b) for b in branches], **kw))


@pytest.mark.parametrize("reuse", ["token", "none", "token+patch"])
def test_exit_macs_match_xla(reuse):
  # Wide enough that normalizations/activations stay under 2% of the total.
  branches = [dict(resolution=8, width=256, depth=1, num_heads=2, mlp_dim=256, patch_size=4),
              dict(resolution=16, width=384, depth=1, num_heads=2, mlp_dim=384, patch_size=4)]
  cfg = _cfg(branches, reuse)
  model = models.build(cfg)
  views = tuple(jnp.zeros((1, r, r, 3), jnp.float32) for r in ravit.input_sizes(cfg))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), views))
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
  macs = models.exit_macs(cfg)
  assert len(macs) == 2 and macs[0] < macs[1]
  for k in range(2):
    # Reaching exit k means running (and evaluating) every exit <= k.
    xla = flops.xla_flops(lambda v, x: model.apply(v, x)[0][:k + 1], variables, views)
    assert xla == pytest.approx(flops.macs_to_flops(macs[k]), rel=0.02), (k, xla, macs[k])


def test_exit_macs_analytic_terms():
  widths = (16, 24, 32)
  branches = [_branch(r, w) for r, w in zip((8, 16, 32), widths)]
  macs = {m: np.array(ravit.exit_macs(_cfg(branches, m)))
          for m in ("token", "logits", "both", "none")}
  k_cls = 10
  vit_only = [flops.vit_macs(image_size=r, patch_size=4, width=w, depth=1, mlp_dim=32,
                             num_classes=k_cls) for r, w in zip((8, 16, 32), widths)]
  np.testing.assert_allclose(macs["none"], np.cumsum(vit_only))
  token_proj = np.cumsum([0, widths[0] * widths[1], widths[1] * widths[2]])
  logit_proj = np.cumsum([0, k_cls * widths[1], k_cls * widths[2]])
  np.testing.assert_allclose(macs["token"] - macs["none"], token_proj)
  np.testing.assert_allclose(macs["logits"] - macs["none"], logit_proj)
  np.testing.assert_allclose(macs["both"] - macs["none"], token_proj + logit_proj)
  # 'patch': branch k-1's g*g tokens projected to width_k, then resized to
  # branch k's G x G grid by one matrix product per axis.
  grids = (2, 4, 8)
  patch = [0] + [grids[k - 1] ** 2 * widths[k - 1] * widths[k]
                 + (grids[k] * grids[k - 1] ** 2 + grids[k] ** 2 * grids[k - 1]) * widths[k]
                 for k in (1, 2)]
  macs_tp = np.array(ravit.exit_macs(_cfg(branches, "token+patch")))
  np.testing.assert_allclose(macs_tp - macs["none"], token_proj + np.cumsum(patch))


def test_patch_reuse_parameters_and_shapes():
  res = (8, 16)
  model = RAViT(branches=_branches(res, (16, 24)), num_classes=NUM_CLASSES,
                reuse="token+patch")
  params = _init(model, _views(res))["params"]
  assert set(params) == {"branch0", "branch1", "reuse_norm1", "reuse_token1",
                         "reuse_patch_norm1", "reuse_patch1"}
  # Projected from branch 0's width (16) to branch 1's (24).
  assert params["reuse_patch1"]["kernel"].shape == (16, 24)
  _, carry = model.apply({"params": params}, 0, _views(res)[0], method=RAViT.branch)
  assert carry["patch_tokens"].shape == (2, 4, 16)  # 2x2 grid of branch 0


@pytest.mark.parametrize("reuse", [pytest.param(r, marks=_SLOW)
                                   for r in ("token", "logits", "both", "patch")]
                         + ["token+patch"])
def test_zero_init_reuse_starts_as_plain_vit(reuse):
  # With reuse_init='zeros', at initialization the helped branch computes
  # exactly what the same branch computes without reuse, whatever branch 0
  # does; the projections still receive gradients, so the reuse is learned.
  res = (8, 16)
  views = _views(res)
  model = RAViT(branches=_branches(res), num_classes=NUM_CLASSES, reuse=reuse,
                reuse_init="zeros")
  plain = RAViT(branches=_branches(res), num_classes=NUM_CLASSES, reuse="none")
  variables = _init(model, views)
  params = dict(variables["params"])
  params["branch0"] = _perturb(params["branch0"], seed=3)
  (_, l1), _ = _apply(model, {"params": params}, views)
  plain_params = {k: params[k] for k in ("branch0", "branch1")}
  (_, p1), _ = _apply(plain, {"params": plain_params}, views)
  np.testing.assert_allclose(np.asarray(l1), np.asarray(p1), rtol=1e-6, atol=1e-6)
  reuse_params = {k: v for k, v in params.items() if k.startswith("reuse_")}
  assert all(np.all(np.asarray(leaf) == 0)
             for name, tree in reuse_params.items() if "norm" not in name
             for leaf in jax.tree_util.tree_leaves(tree))

  def loss(p):
    (_, out), _ = model.apply({"params": p}, views)
    return jnp.sum(out ** 2)

  g = jax.jit(jax.grad(loss))(params)
  for name in reuse_params:
    if "norm" not in name:
      assert float(optax_global_norm(g[name])) > 0.0, name
  # The default initialization does change the helped branch at step 0.
  default = RAViT(branches=_branches(res), num_classes=NUM_CLASSES, reuse=reuse)
  dparams = dict(_init(default, views)["params"])
  dparams["branch0"], dparams["branch1"] = params["branch0"], params["branch1"]
  (_, d1), _ = _apply(default, {"params": dparams}, views)
  assert np.max(np.abs(np.asarray(d1) - np.asarray(p1))) > 1e-4


def test_build_and_resolutions_from_config():
  cfg = _cfg([dict(resolution=112, variant="Ti/16"), dict(resolution=160, variant="Ti/16"),
              dict(resolution=224, variant="Ti/16", dropout=0.1)],
             stop_gradient_reuse=True, dtype="bfloat16")
  model = models.build(cfg)
  assert isinstance(model, RAViT)
  assert ravit.input_sizes(cfg) == (112, 160, 224)
  assert model.dtype == jnp.bfloat16 and model.stop_gradient_reuse
  assert hash(model) == hash(models.build(cfg))  # hashable: usable as a jit static arg
  macs = models.exit_macs(cfg)
  assert len(macs) == 3 and all(np.diff(macs) > 0)
  assert models.num_exits(cfg) == 3
  # Branches given as ConfigDicts work too.
  cfg2 = ml_collections.ConfigDict(dict(name="ravit", num_classes=200, branches=[
      ml_collections.ConfigDict(dict(resolution=32, variant="Nano/4")),
      ml_collections.ConfigDict(dict(resolution=64, variant="Nano/8"))]))
  assert ravit.input_sizes(cfg2) == (32, 64)


def test_train_mode_with_dropout_and_stochastic_depth():
  res = (8, 16)
  branches = tuple(_branch(r, depth=2, dropout=0.1, stochastic_depth=0.2) for r in res)
  model = RAViT(branches=branches, num_classes=NUM_CLASSES)
  views = _views(res, batch=4)
  variables = _init(model, views)
  run = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}))
  a, _ = run(variables, views, jax.random.key(1))
  b, _ = run(variables, views, jax.random.key(2))
  e, _ = _apply(model, variables, views)
  assert not np.allclose(a[1], b[1])
  assert all(x.shape == (4, NUM_CLASSES) for x in a + e)


# ----------------------------------------------------------------------------
# Validation

def _expect(match, fn):
  with pytest.raises(ValueError, match=match):
    fn()


def test_rejects_bad_branch_lists():
  _expect("at least 1 branch", lambda: ravit.build(_cfg([])))
  _expect("strictly increasing",
          lambda: ravit.build(_cfg([_branch(16), _branch(16)])))
  _expect("strictly increasing",
          lambda: ravit.build(_cfg([_branch(32), _branch(16)])))
  _expect("not divisible by its patch size",
          lambda: ravit.build(_cfg([_branch(8), _branch(18)])))
  _expect("unknown RAViT reuse", lambda: ravit.build(_cfg([_branch(8)], reuse="concat")))
  _expect("unknown RAViT reuse", lambda: ravit.build(_cfg([_branch(8)], reuse="token+token")))
  _expect("unknown RAViT reuse", lambda: ravit.build(_cfg([_branch(8)], reuse="token+both")))
  _expect("unknown RAViT reuse_init",
          lambda: ravit.build(_cfg([_branch(8)], reuse_init="ones")))
  _expect("unknown keys", lambda: ravit.build(_cfg([dict(_branch(8), num_classes=3)])))
  _expect("no 'resolution'", lambda: ravit.build(_cfg([{"variant": "Ti/16"}])))
  _expect("unknown RAViT config keys",
          lambda: ravit.build(_cfg([_branch(8)], image_size=32)))
  # The module validates too when built directly.
  model = RAViT(branches=(_branch(16), _branch(8)), num_classes=3)
  _expect("strictly increasing", lambda: _init(model, _views((16, 8))))
  model = RAViT(branches=(_branch(8),), num_classes=3, reuse="sum")
  _expect("unknown RAViT reuse", lambda: _init(model, _views((8,))))


def test_rejects_bad_views():
  res = (8, 16)
  model = RAViT(branches=_branches(res), num_classes=NUM_CLASSES)
  views = _views(res)
  variables = _init(model, views)
  _expect("got 1 views", lambda: model.apply(variables, views[:1]))
  _expect("got 3 views", lambda: model.apply(variables, views + views[:1]))
  _expect("tuple of views", lambda: model.apply(variables, views[1]))
  _expect(r"branch 1 expects a view of shape \[B, 16, 16, C\]",
          lambda: model.apply(variables, (views[0], views[0])))
  _expect("needs `prev`",
          lambda: model.apply(variables, 1, views[1], None, method=RAViT.branch))
  _expect("branch index",
          lambda: model.apply(variables, 2, views[1], None, method=RAViT.branch))
