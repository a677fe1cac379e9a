"""Vision Transformer (Dosovitskiy et al. 2021), pre-LayerNorm, with a class token.

`ViT(variant='Ti/16', num_classes=10)(images, train=...)` returns
`(logits, out)`; `out` holds every block's tokens, the final normalized tokens,
the class token and the pre-logits features, so early exits, the resolution
cascade and distillation read what they need without model surgery.

The `vit` model family (`models.build(cfg)` with `cfg.name == 'vit'`) builds a
`SingleExitViT`: the same module and parameters, returning `((logits,), out)`
like every family (a tuple of exits). `ViT` itself keeps `(logits, out)`,
which RAViT's branches and `EarlyExitViT` build on.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision import flops
from adaptive_vision.models import _check_image_size, module_kwargs, one_image_input
from adaptive_vision.models.layers import ATTENTIONS, PLAIN, Layers

# width, depth, heads, mlp: the standard sizes (Dosovitskiy et al.; Touvron et
# al. for Ti/S) plus two small ones sized for CPU experiments on CIFAR.
SIZES = {
    "Mu": dict(width=128, depth=6, num_heads=4, mlp_dim=512),
    "Nano": dict(width=96, depth=4, num_heads=3, mlp_dim=384),
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "M": dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}
_DIMS = ("width", "depth", "num_heads", "mlp_dim", "patch_size")


def decode_variant(variant: Optional[str] = None, **overrides) -> dict:
  """'S/16' -> dict(width, depth, num_heads, mlp_dim, patch_size).

  Explicit keyword overrides (None means "not given") win over the variant,
  so `decode_variant('Ti/4', depth=6)` is a 6-block Ti with 4x4 patches.
  """
  dims: dict[str, Any] = {}
  if variant:
    size, _, patch = variant.partition("/")
    if size not in SIZES or not patch.isdigit():
      raise ValueError(
          f"unknown ViT variant {variant!r}; use '<size>/<patch>' with size in "
          f"{sorted(SIZES)} (e.g. 'Ti/16', 'S/4'), or give width/depth/"
          "num_heads/mlp_dim/patch_size explicitly")
    dims = dict(SIZES[size], patch_size=int(patch))
  dims.update({k: v for k, v in overrides.items() if v is not None})
  missing = [k for k in _DIMS if k not in dims]
  if missing:
    raise ValueError(f"ViT needs {missing}: give a variant such as 'Ti/16' or set them")
  if dims["width"] % dims["num_heads"]:
    raise ValueError(f"ViT width {dims['width']} is not divisible by "
                     f"num_heads {dims['num_heads']}")
  return dims


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype,
                 kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(1e-6))(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(width, dtype=self.dtype,
                 kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(1e-6))(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


def _flat_init(init, shape, fan_in_axes: int):
  """Initializes a [in..., out...] kernel as the equivalent 2-D matrix, as
  `nn.DenseGeneral` does, so fan-in/fan-out match a plain Dense layer."""
  def wrapped(key, _shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:fan_in_axes])), int(np.prod(shape[fan_in_axes:])))
    return init(key, flat, dtype).reshape(shape)
  return wrapped


class _Projection(nn.Module):
  """`einsum(spec, x, kernel) + bias` with `nn.DenseGeneral`'s parameter names,
  shapes and initialization, but with the output layout chosen by `spec`."""
  spec: str
  kernel_shape: tuple
  bias_shape: tuple
  bias_broadcast: tuple  # the bias reshaped to broadcast against the output
  fan_in_axes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _flat_init(nn.initializers.xavier_uniform(),
                                             self.kernel_shape, self.fan_in_axes),
                        self.kernel_shape)
    bias = self.param("bias", nn.initializers.zeros, self.bias_shape)
    y = jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype).reshape(self.bias_broadcast)


class Attention(nn.Module):
  """Multi-head self-attention.

  implementation (`models.layers.Layers.attention`):
    'fused': `jax.nn.dot_product_attention` on [B, N, H, d], which XLA maps to
      a flash-style kernel on GPU/TPU (the plain default);
    'xla': explicit einsums with the heads-first layout [B, H, N, d] produced
      directly by the q/k/v projection, so the batched dots need no transposes
      (on CPU, where no fused kernel exists, this made the CIFAR ViT train
      step ~6% faster; results/bench_notes.md; the CPU backend's choice).
  Both have the same parameters (those of `nn.DenseGeneral` 'qkv' and 'out').
  """
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = "fused"

  @nn.compact
  def __call__(self, x):
    b, n, width = x.shape
    h = self.num_heads
    d = width // h
    impl = self.implementation
    if impl not in ATTENTIONS:
      raise ValueError(f"attention implementation {impl!r}; use one of {ATTENTIONS}")
    if impl == "fused":
      qkv = nn.DenseGeneral((3, h, d), dtype=self.dtype,
                            kernel_init=nn.initializers.xavier_uniform(), name="qkv")(x)
      y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
      return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                             kernel_init=nn.initializers.xavier_uniform(), name="out")(y)
    qkv = _Projection("bnc,cshd->sbhnd", (width, 3, h, d), (3, h, d), (3, 1, h, 1, d),
                      1, self.dtype, name="qkv")(x)
    q, k, v = qkv[0] * jnp.asarray(d ** -0.5, qkv.dtype), qkv[1], qkv[2]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    y = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    return _Projection("bhnd,hdc->bnc", (h, d, width), (width,), (width,), 2,
                       self.dtype, name="out")(y)


def _drop_path(x, rate: float, train: bool, module: nn.Module):
  """Stochastic depth: drops the whole residual branch per example."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "fused"

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
    y = Attention(self.num_heads, dtype=self.dtype, implementation=self.attention,
                  name="attn")(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    x = x + _drop_path(y, self.drop_path, train, self)
    y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, dtype=self.dtype, name="mlp")(y, train=train)
    return x + _drop_path(y, self.drop_path, train, self)


class ViT(nn.Module):
  """ViT classifier. See `decode_variant` for sizes.

  `cls_bias` ([B, width], optional) is added to the class token before the
  first block, `patch_bias` ([B, patches, width], optional) to the patch
  embeddings: the hooks through which a RAViT branch receives what the
  previous branch computed.
  """
  num_classes: int
  variant: Optional[str] = None
  width: Optional[int] = None
  depth: Optional[int] = None
  num_heads: Optional[int] = None
  mlp_dim: Optional[int] = None
  patch_size: Optional[int] = None
  pool: str = "token"            # 'token' (class token) or 'gap' (mean of patches)
  dropout: float = 0.0
  stochastic_depth: float = 0.0  # drop-path rate of the last block (linear ramp)
  head_zero_init: bool = True
  dtype: Any = jnp.float32       # compute dtype; parameters stay float32
  layers: Layers = PLAIN         # models.layers (here: the attention implementation)

  @property
  def dims(self) -> dict:
    return decode_variant(self.variant, width=self.width, depth=self.depth,
                          num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                          patch_size=self.patch_size)

  @nn.compact
  def __call__(self, images, *, train: bool = False, cls_bias=None, patch_bias=None):
    d = self.dims
    p = d["patch_size"]
    _check_image_size(images.shape[1], p, "ViT")
    _check_image_size(images.shape[2], p, "ViT")
    if self.pool not in ("token", "gap"):
      raise ValueError(f"ViT pool={self.pool!r}; use 'token' or 'gap'")
    x = nn.Conv(d["width"], (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="embedding")(images.astype(self.dtype))
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02),
                       (1, h * w, c)).astype(self.dtype)
    if patch_bias is not None:
      if patch_bias.shape != (b, h * w, c):
        raise ValueError(f"ViT patch_bias must have shape {(b, h * w, c)} (batch, "
                         f"patches, width), got {patch_bias.shape}")
      x = x + patch_bias.astype(self.dtype)
    cls = jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (1, 1, c)),
                           (b, 1, c)).astype(self.dtype)
    if cls_bias is not None:
      cls = cls + cls_bias[:, None, :].astype(self.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    blocks = []
    depth = d["depth"]
    for i in range(depth):
      rate = self.stochastic_depth * i / max(depth - 1, 1)
      x = EncoderBlock(d["num_heads"], d["mlp_dim"], self.dropout, rate,
                       dtype=self.dtype, attention=self.layers.attention,
                       name=f"block{i}")(x, train=train)
      blocks.append(x)
    encoded = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
    pre_logits = encoded[:, 0] if self.pool == "token" else encoded[:, 1:].mean(1)
    head_init = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
    logits = nn.Dense(self.num_classes, kernel_init=head_init, name="head")(
        pre_logits.astype(jnp.float32))
    out = {"blocks": tuple(blocks), "encoded": encoded, "cls_token": encoded[:, 0],
           "pre_logits": pre_logits}
    return logits, out


def resample_posemb(posemb: jax.Array, new_grid: int) -> jax.Array:
  """Resizes learned position embeddings [1, g*g, D] to [1, new_grid**2, D]."""
  _, n, c = posemb.shape
  old = int(round(np.sqrt(n)))
  if old * old != n:
    raise ValueError(f"position embedding has {n} tokens, not a square grid")
  if old == new_grid:
    return posemb
  grid = posemb.reshape(1, old, old, c)
  grid = jax.image.resize(grid, (1, new_grid, new_grid, c), "bilinear", antialias=True)
  return grid.reshape(1, new_grid * new_grid, c)


def resample_params(params: dict, image_size: int, patch_size: int) -> dict:
  """Params of a ViT adapted to another input resolution."""
  params = jax.tree_util.tree_map(lambda x: x, params)  # shallow copy of the tree
  params = dict(params)
  params["pos_embedding"] = resample_posemb(params["pos_embedding"], image_size // patch_size)
  return params


class SingleExitViT(ViT):
  """`ViT` as a model family: the logits come as a tuple of one exit.

  Same fields and parameter names as `ViT` (checkpoints load either way);
  returns `((logits,), out)`.
  """

  @property
  def num_exits(self) -> int:
    return 1

  @nn.compact
  def __call__(self, images, *, train: bool = False, cls_bias=None, patch_bias=None):
    logits, out = super().__call__(images, train=train, cls_bias=cls_bias,
                                   patch_bias=patch_bias)
    return (logits,), out

  def segment(self, k: int, images, carry=None, *, train: bool = False):
    """The early-exit executors' interface (see `ravit.RAViT.segment`): one
    exit, so segment 0 is the whole model; returns `(logits, None)`."""
    if k != 0:
      raise ValueError(f"a ViT has one exit: segment index must be 0, got {k!r}")
    (logits,), _ = self(images, train=train)
    return logits, None


# ----------------------------------------------------------------------------
# Model-family contract (see adaptive_vision/models/__init__.py)

def _kwargs(model_cfg) -> dict:
  return module_kwargs(model_cfg, ViT)


def build(model_cfg) -> SingleExitViT:
  vit = SingleExitViT(**_kwargs(model_cfg))
  if "image_size" in model_cfg:
    _check_image_size(model_cfg.image_size, vit.dims["patch_size"], "model")
  return vit


input_sizes = one_image_input  # one image batch of model.image_size


def exit_macs(model_cfg) -> list[float]:
  vit = build(model_cfg)
  d = vit.dims
  return [flops.vit_macs(image_size=model_cfg.image_size, patch_size=d["patch_size"],
                         width=d["width"], depth=d["depth"], mlp_dim=d["mlp_dim"],
                         num_classes=vit.num_classes)]
