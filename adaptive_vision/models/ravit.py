"""RAViT: a resolution-adaptive cascade of ViTs (Guidez, Duffner, Garcia 2026).

Branch k is a `vit.ViT` applied to view k of the image, the views coming in
strictly increasing resolution. Branch k starts from branch k-1's prediction:
a projection of what branch k-1 produced is added to branch k's class token
through the ViT's `cls_bias` hook. Every branch ends in a classifier, i.e. an
exit; at inference an entropy criterion decides after each branch whether the
example stops there (`adaptive_vision.inference.DynamicCascade`).

    model = RAViT(branches=({'resolution': 16, 'variant': 'Nano/4'},
                            {'resolution': 32, 'variant': 'Nano/4'}),
                  num_classes=10)
    exit_logits, out = model.apply(variables, (view16, view32))
    logits0, carry = model.apply(variables, 0, view16, method=RAViT.branch)
    logits1, _ = model.apply(variables, 1, view32, carry, method=RAViT.branch)

Reuse modes (how branch k receives what branch k-1 computed); a mode is one
part or several joined by '+', e.g. ``'token+patch'``:

* ``'token'`` (default): LayerNorm + Dense(width_k) of branch k-1's final class
  token (``out['cls_token']``, already after its final LayerNorm), added to
  branch k's class token;
* ``'logits'``: Dense(width_k) of the softmax of branch k-1's logits (the
  prediction itself), added to branch k's class token;
* ``'patch'`` (beyond the paper, as CF-ViT reuses features): LayerNorm +
  Dense(width_k) of branch k-1's final patch tokens, resized bilinearly from
  its patch grid to branch k's and added to branch k's patch embeddings, so a
  shallow fine branch starts from features the coarse branch already built;
* ``'both'``: ``'token+logits'``, the paper's prediction reuse;
* ``'none'``: independent branches.

``reuse_init='zeros'`` initializes every reuse projection to zero, so at step
0 each helped branch is exactly a plain ViT and the reuse is learned from
there; ``'default'`` initializes them like any Dense layer.

Parameters are named ``branch{k}`` (the ViTs) and ``reuse_norm{k}``,
``reuse_token{k}``, ``reuse_logits{k}``, ``reuse_patch_norm{k}``,
``reuse_patch{k}`` (k >= 1), whether the model runs whole (`__call__`) or one
branch at a time (`branch`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from adaptive_vision import flops
from adaptive_vision.models import vit as vit_lib
from adaptive_vision.models.layers import PLAIN, Layers

REUSE_PARTS = ("token", "logits", "patch")
_REUSE_ALIASES = {"both": ("token", "logits"), "none": ()}
REUSE_MODES = REUSE_PARTS + tuple(_REUSE_ALIASES)  # and '+' joins of the parts
REUSE_INITS = ("default", "zeros")


def reuse_parts(reuse: str) -> frozenset:
  """'token+patch' -> {'token', 'patch'}; 'both' -> {'token', 'logits'}."""
  if not isinstance(reuse, str):
    raise ValueError(f"RAViT reuse must be a string, got {reuse!r}")
  if reuse in _REUSE_ALIASES:
    return frozenset(_REUSE_ALIASES[reuse])
  parts = reuse.split("+")
  if not all(p in REUSE_PARTS for p in parts) or len(set(parts)) != len(parts):
    raise ValueError(f"unknown RAViT reuse={reuse!r}; use one of {REUSE_MODES} or "
                     f"parts of {REUSE_PARTS} joined by '+', e.g. 'token+patch'")
  return frozenset(parts)

# Keys a branch dict may hold: its resolution plus ViT fields. `num_classes`
# and `dtype` are shared by all branches and set on RAViT itself.
_VIT_FIELDS = ({f.name for f in dataclasses.fields(vit_lib.ViT)}
               - {"parent", "name", "num_classes", "dtype", "layers"})
_BRANCH_KEYS = _VIT_FIELDS | {"resolution"}


@dataclasses.dataclass(frozen=True)
class BranchSpec:
  resolution: int
  vit_kwargs: dict   # ViT fields of this branch (no num_classes/dtype)
  dims: dict         # decoded width/depth/num_heads/mlp_dim/patch_size


def _branch_specs(branches: Any, reuse: str = "token",
                  reuse_init: str = "default") -> tuple[BranchSpec, ...]:
  """Validates the branch list and reuse mode; returns one spec per branch."""
  reuse_parts(reuse)
  if reuse_init not in REUSE_INITS:
    raise ValueError(f"unknown RAViT reuse_init={reuse_init!r}; use one of {REUSE_INITS}")
  if branches is None or isinstance(branches, (str, bytes, Mapping)):
    raise ValueError("RAViT branches must be a sequence of branch dicts, e.g. "
                     "({'resolution': 16, 'variant': 'Nano/4'}, "
                     "{'resolution': 32, 'variant': 'Nano/4'})")
  branches = tuple(branches)
  if len(branches) < 1:
    raise ValueError("RAViT needs at least 1 branch; give model.branches as a "
                     "sequence of dicts, each with a resolution and ViT fields")
  specs = []
  for k, b in enumerate(branches):
    try:
      b = dict(b)
    except (TypeError, ValueError):
      raise ValueError(f"RAViT branch {k} must be a dict (or ConfigDict), got "
                       f"{type(b).__name__}") from None
    unknown = set(b) - _BRANCH_KEYS
    if unknown:
      raise ValueError(f"unknown keys {sorted(unknown)} in RAViT branch {k}; valid keys "
                       f"are {sorted(_BRANCH_KEYS)} (num_classes and dtype are set "
                       "on the model, not per branch)")
    if "resolution" not in b:
      raise ValueError(f"RAViT branch {k} has no 'resolution'; set the input "
                       "resolution of each branch")
    r = b.pop("resolution")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
      raise ValueError(f"RAViT branch {k} resolution must be a positive int, got {r!r}")
    try:
      dims = vit_lib.decode_variant(b.get("variant"), **{
          d: b.get(d) for d in vit_lib._DIMS})
    except ValueError as e:
      raise ValueError(f"RAViT branch {k}: {e}") from None
    if r % dims["patch_size"]:
      raise ValueError(
          f"RAViT branch {k}: resolution {r} is not divisible by its patch size "
          f"{dims['patch_size']}; use a resolution that is a multiple of "
          f"{dims['patch_size']} or another patch size")
    if specs and r <= specs[-1].resolution:
      raise ValueError(
          f"RAViT resolutions must be strictly increasing (cheapest branch first), "
          f"got {[s.resolution for s in specs] + [r]}; order the branches by "
          "resolution and drop duplicates")
    specs.append(BranchSpec(resolution=r, vit_kwargs=b, dims=dims))
  return tuple(specs)


class RAViT(nn.Module):
  """Resolution cascade of ViT branches with reuse of the previous prediction.

  Attributes:
    branches: sequence of dicts (or ConfigDicts), lowest resolution first, each
      with `resolution` and ViT fields (`variant` and/or width, depth,
      num_heads, mlp_dim, patch_size; dropout, stochastic_depth, pool, ...).
    num_classes: classes of every exit.
    reuse: 'token' | 'logits' | 'patch' | 'both' | 'none', or parts joined by
      '+' (see module docstring).
    reuse_init: 'default' | 'zeros' (reuse projections start at zero).
    stop_gradient_reuse: no gradient flows from branch k into branch k-1
      through what it reuses.
    dtype: compute dtype of every branch; parameters stay float32.
    layers: `models.layers.Layers` of every branch.
  """
  branches: Sequence[Any]
  num_classes: int
  reuse: str = "token"
  reuse_init: str = "default"
  stop_gradient_reuse: bool = False
  dtype: Any = jnp.float32
  layers: Layers = PLAIN

  def __post_init__(self):
    # Freeze the branch dicts so the module stays hashable (jit static args).
    b = self.branches
    if isinstance(b, (tuple, list)):
      try:
        frozen = tuple(FrozenDict(dict(x)) for x in b)  # dicts or ConfigDicts
      except (TypeError, ValueError):
        frozen = None  # left as given; _branch_specs explains what is wrong
      if frozen is not None:
        object.__setattr__(self, "branches", frozen)
    super().__post_init__()

  @property
  def specs(self) -> tuple[BranchSpec, ...]:
    return _branch_specs(self.branches, self.reuse, self.reuse_init)

  @property
  def reuses(self) -> frozenset:
    return reuse_parts(self.reuse)

  @property
  def resolutions(self) -> tuple[int, ...]:
    return tuple(s.resolution for s in self.specs)

  @property
  def num_exits(self) -> int:
    return len(self.specs)

  def setup(self):
    specs = self.specs
    parts = self.reuses
    self.vits = [vit_lib.ViT(num_classes=self.num_classes, dtype=self.dtype,
                             layers=self.layers, name=f"branch{k}", **s.vit_kwargs)
                 for k, s in enumerate(specs)]
    if self.reuse_init == "zeros":
      init = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
    else:
      init = {}
    dense = lambda width, name: nn.Dense(width, dtype=self.dtype, name=name, **init)
    norms, token_proj, logit_proj, patch_norms, patch_proj = {}, {}, {}, {}, {}
    for k in range(1, len(specs)):
      width = specs[k].dims["width"]
      if "token" in parts:
        norms[k] = nn.LayerNorm(dtype=self.dtype, name=f"reuse_norm{k}")
        token_proj[k] = dense(width, f"reuse_token{k}")
      if "logits" in parts:
        logit_proj[k] = dense(width, f"reuse_logits{k}")
      if "patch" in parts:
        patch_norms[k] = nn.LayerNorm(dtype=self.dtype, name=f"reuse_patch_norm{k}")
        patch_proj[k] = dense(width, f"reuse_patch{k}")
    self.reuse_norms = norms
    self.reuse_token = token_proj
    self.reuse_logits = logit_proj
    self.reuse_patch_norms = patch_norms
    self.reuse_patch = patch_proj

  def _reuse_biases(self, k: int, prev: Optional[Mapping[str, jax.Array]]):
    """(cls_bias, patch_bias) for branch k from branch k-1's carry."""
    parts = self.reuses
    if k == 0 or not parts:
      return None, None
    if prev is None:
      raise ValueError(f"RAViT.branch({k}) with reuse={self.reuse!r} needs `prev`, "
                       f"the carry returned by branch {k - 1}")
    if self.stop_gradient_reuse:
      prev = jax.tree_util.tree_map(jax.lax.stop_gradient, prev)
    cls_bias = patch_bias = None
    if "token" in parts:
      cls_bias = self.reuse_token[k](self.reuse_norms[k](prev["cls_token"]))
    if "logits" in parts:
      probs = jax.nn.softmax(prev["logits"].astype(jnp.float32), axis=-1)
      proj = self.reuse_logits[k](probs)
      cls_bias = proj if cls_bias is None else cls_bias + proj
    if "patch" in parts:
      patch_bias = self._patch_bias(k, prev["patch_tokens"])
    return cls_bias, patch_bias

  def _patch_bias(self, k: int, tokens):
    """Branch k-1's patch tokens [B, g*g, w] -> [B, G*G, width_k] on branch k's
    grid: projected first (on the fewer, coarse tokens; linear, so it commutes
    with the bilinear resize), then resized."""
    g, big = _grid(self.specs[k - 1]), _grid(self.specs[k])
    y = self.reuse_patch[k](self.reuse_patch_norms[k](tokens))
    b, _, width = y.shape
    y = y.reshape(b, g, g, width)
    if g != big:
      y = jax.image.resize(y, (b, big, big, width), "linear", antialias=False)
    return y.reshape(b, big * big, width)

  def _carry(self, logits, out) -> dict:
    """What branch k+1 needs from branch k (nothing for reuse='none')."""
    parts = self.reuses
    carry = {}
    if "token" in parts:
      carry["cls_token"] = out["cls_token"]
    if "logits" in parts:
      carry["logits"] = logits
    if "patch" in parts:
      carry["patch_tokens"] = out["encoded"][:, 1:]
    return carry

  def _check_view(self, k: int, view) -> None:
    r = self.specs[k].resolution
    shape = getattr(view, "shape", None)
    if shape is None or len(shape) != 4 or shape[1] != r or shape[2] != r:
      raise ValueError(f"RAViT branch {k} expects a view of shape [B, {r}, {r}, C], "
                       f"got {shape}; views must follow model resolutions "
                       f"{self.resolutions}, lowest first")

  def _run(self, k: int, view, prev, train: bool):
    self._check_view(k, view)
    cls_bias, patch_bias = self._reuse_biases(k, prev)
    logits, out = self.vits[k](view, train=train, cls_bias=cls_bias, patch_bias=patch_bias)
    return logits, out

  def branch(self, k: int, view, prev=None, *, train: bool = False):
    """Runs branch `k` alone: returns `(logits [B, K], carry)`.

    `prev` is the carry returned by branch k-1 (ignored for k=0 and
    reuse='none'); `carry` is a dict with what branch k+1 needs
    ('cls_token', 'logits', 'patch_tokens', depending on `reuse`). Chaining branches
    gives the same logits as `__call__`.
    """
    if not isinstance(k, int) or not 0 <= k < self.num_exits:
      raise ValueError(f"RAViT branch index must be an int in [0, {self.num_exits}), "
                       f"got {k!r}")
    logits, out = self._run(k, view, prev, train)
    return logits, self._carry(logits, out)

  def segment(self, k: int, views, carry=None, *, train: bool = False):
    """`branch(k, views[k], carry)`: the interface every early-exit family
    offers its executors (`adaptive_vision.inference`), which pass the model's
    whole input to each segment and let it take what it needs."""
    return self.branch(k, views[k], carry, train=train)

  def __call__(self, views, *, train: bool = False):
    """views: tuple of [B, r_k, r_k, 3], lowest resolution first.

    Returns `(exit_logits, out)`: exit_logits is a tuple with one [B, K] per
    branch, cheapest first; out = dict(branches=tuple of each ViT's `out`).
    """
    if not isinstance(views, (tuple, list)):
      raise ValueError(f"RAViT takes a tuple of views, one per resolution "
                       f"{self.resolutions} (lowest first), got a single "
                       f"{type(views).__name__}; pass one view per resolution "
                       f"{list(self.resolutions)}")
    if len(views) != self.num_exits:
      raise ValueError(f"RAViT has {self.num_exits} branches at resolutions "
                       f"{self.resolutions} but got {len(views)} views; give one "
                       "view per branch")
    batch = {getattr(v, "shape", (None,))[0] for v in views}
    if len(batch) != 1:
      raise ValueError(f"RAViT views have different batch sizes {sorted(batch, key=str)}")
    exit_logits, outs, prev = [], [], None
    for k, view in enumerate(views):
      logits, out = self._run(k, view, prev, train)
      prev = self._carry(logits, out)
      exit_logits.append(logits)
      outs.append(out)
    return tuple(exit_logits), {"branches": tuple(outs)}


# ----------------------------------------------------------------------------
# Model-family contract (see adaptive_vision/models/__init__.py)

_FIELDS = {"branches", "num_classes", "reuse", "reuse_init", "stop_gradient_reuse", "dtype"}
_CONFIG_ONLY = {"name"}


def _kwargs(model_cfg) -> dict:
  cfg = dict(model_cfg)
  unknown = set(cfg) - _FIELDS - _CONFIG_ONLY
  if unknown:
    raise ValueError(f"unknown RAViT config keys {sorted(unknown)}; valid keys are "
                     f"{sorted(_FIELDS | _CONFIG_ONLY)} (ViT fields and resolutions "
                     "go inside each entry of model.branches)")
  for key in ("branches", "num_classes"):
    if key not in cfg:
      raise ValueError(f"RAViT config needs model.{key}")
  kw = {k: v for k, v in cfg.items() if k in _FIELDS}
  kw["branches"] = tuple(dict(b) for b in _branch_list(kw["branches"]))
  if isinstance(kw.get("dtype"), str):
    kw["dtype"] = jnp.dtype(kw["dtype"])
  return kw


def _branch_list(branches) -> tuple:
  if branches is None or isinstance(branches, (str, bytes, Mapping)):
    _branch_specs(branches)  # raises the explanatory error
  return tuple(branches)


def build(model_cfg) -> RAViT:
  model = RAViT(**_kwargs(model_cfg))
  _branch_specs(model.branches, model.reuse, model.reuse_init)  # fail early, at build time
  return model


# A cascade reads one view of the image per branch, lowest resolution first.
TAKES_VIEWS = True


def input_sizes(model_cfg) -> tuple[int, ...]:
  """Input resolutions of the branches, lowest first."""
  return build(model_cfg).resolutions



def _grid(spec: BranchSpec) -> int:
  return spec.resolution // spec.dims["patch_size"]


def exit_macs(model_cfg) -> list[float]:
  """Cumulative MACs per image to reach and evaluate each exit.

  Exit k costs every branch <= k (its ViT at its resolution, head included)
  plus the reuse projections into branches 1..k: width_{k-1} x width_k for
  'token' (the LayerNorms are not counted, as in the ViT), K x width_k for
  'logits', and for 'patch' the projection of branch k-1's g*g patch tokens
  plus the bilinear resize to branch k's G x G grid, which runs as one matrix
  product per axis (G*g*g + G*G*g) x width_k.
  """
  model = build(model_cfg)
  specs = model.specs
  parts = model.reuses
  total, macs = 0.0, []
  for k, s in enumerate(specs):
    d = s.dims
    total += flops.vit_macs(image_size=s.resolution, patch_size=d["patch_size"],
                            width=d["width"], depth=d["depth"], mlp_dim=d["mlp_dim"],
                            num_classes=model.num_classes)
    if k > 0:
      prev_width = specs[k - 1].dims["width"]
      if "token" in parts:
        total += flops.dense_macs(1, prev_width, d["width"])
      if "logits" in parts:
        total += flops.dense_macs(1, model.num_classes, d["width"])
      if "patch" in parts:
        g, big = _grid(specs[k - 1]), _grid(s)
        total += flops.dense_macs(g * g, prev_width, d["width"])
        if g != big:
          total += (big * g * g + big * big * g) * d["width"]
    macs.append(total)
  return macs
