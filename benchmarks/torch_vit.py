"""The PyTorch peer of the CIFAR ViT: adaptive_vision.models.vit in eager torch.

Layer for layer: patch-embedding convolution (kernel = stride = patch),
learned position embeddings, a class token prepended, pre-LayerNorm blocks
(eps 1e-6; fused qkv projection, scaled dot-product attention, output
projection; MLP with tanh GELU as flax's `nn.gelu`), a final LayerNorm and a
linear head on the class token. The step is the trainer's: softmax cross
entropy, AdamW with weight decay on weight matrices and kernels only
(optim.wd_mask 'kernels'), clipping by global norm, warmup + cosine, and
the metrics the JAX step computes (accuracy, gradient and parameter norms).

    python -m benchmarks.torch_vit '<spec>'   train steps on request (common.Child)
"""

from __future__ import annotations

import json
import math
import sys

from benchmarks import common


def spec_from_config(config, batch: int, total_steps: int = 10_000) -> dict:
  from adaptive_vision.models import vit
  m, o = config.model, config.optim
  if m.pool != "token" or m.dropout or m.stochastic_depth or o.name != "adamw":
    raise ValueError("the torch peer is the token-pooled ViT without dropout, trained by AdamW")
  dims = vit.decode_variant(m.get("variant"), **{k: m.get(k) for k in (
      "width", "depth", "num_heads", "mlp_dim", "patch_size")})
  warmup = o.warmup_steps or int(round(o.warmup_fraction * total_steps))
  return dict(dims, image_size=int(m.image_size), num_classes=int(m.num_classes), batch=batch,
              lr=float(o.lr), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
              weight_decay=float(o.weight_decay), grad_clip=float(o.grad_clip or 0.0),
              warmup=min(warmup, total_steps - 1), total_steps=total_steps)


def build(spec: dict):
  import torch
  from torch import nn
  import torch.nn.functional as F
  width, heads, p = spec["width"], spec["num_heads"], spec["patch_size"]

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
      b, n, c = x.shape
      qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
      y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
      return self.out(y.transpose(1, 2).reshape(b, n, c))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention()
      self.norm2 = nn.LayerNorm(width, eps=1e-6)
      self.mlp = nn.Sequential(nn.Linear(width, spec["mlp_dim"]), nn.GELU(approximate="tanh"),
                               nn.Linear(spec["mlp_dim"], width))

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      grid = spec["image_size"] // p
      self.embedding = nn.Conv2d(3, width, p, stride=p)
      self.pos_embedding = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
      self.cls = nn.Parameter(torch.zeros(1, 1, width))
      self.blocks = nn.ModuleList(Block() for _ in range(spec["depth"]))
      self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, spec["num_classes"])

    def forward(self, images):  # [B, 3, H, W]
      x = self.embedding(images).flatten(2).transpose(1, 2) + self.pos_embedding
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
      for block in self.blocks:
        x = block(x)
      return self.head(self.encoder_norm(x)[:, 0])

  return ViT()


def train_step(spec: dict):
  import torch
  import torch.nn.functional as F
  torch.manual_seed(0)
  model = build(spec).train()
  decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
  rest = [p for p in model.parameters() if id(p) not in set(map(id, decay))]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                           {"params": rest, "weight_decay": 0.0}],
                          lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"])
  w, total = spec["warmup"], spec["total_steps"]
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / max(w, 1) if s < w else
                                            0.5 * (1 + math.cos(math.pi * (s - w) / (total - w))))
  gen = torch.Generator().manual_seed(0)
  s = spec["image_size"]
  x = torch.randn(spec["batch"], 3, s, s, generator=gen)
  y = torch.randint(0, spec["num_classes"], (spec["batch"],), generator=gen)
  params = list(model.parameters())

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"] or math.inf)
    opt.step()
    sched.step()
    with torch.no_grad():
      _metrics = (grad_norm, (logits.argmax(-1) == y).float().mean(),
                 torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params))))
    return loss  # eager: the metrics above are computed already

  return step, model


if __name__ == "__main__":
  common.serve_torch(train_step, json.loads(sys.argv[1]))
