"""The PyTorch peer: the same ViT as adaptive_vision.models.vit, and its timings.

Same architecture, layer for layer: a patch-embedding convolution (kernel =
stride = patch), learned position embeddings added to the patches, a class
token prepended, pre-LayerNorm blocks (LayerNorm eps 1e-6 as flax; fused qkv
projection with bias, scaled dot-product attention, output projection; MLP
with tanh-approximated GELU as flax's `nn.gelu`), a final LayerNorm and a
linear head on the class token; stochastic depth with flax's linear ramp when
the config sets it. Training: softmax cross entropy (mean),
AdamW (decoupled weight decay on weight matrices and conv kernels only, as
optim.weight_decay_mask 'kernels'), gradient clipping by global norm, a
warmup + cosine learning-rate schedule, and the same metrics the JAX step
computes (accuracy, gradient and parameter norms).

`parameter_count(spec)` must equal the flax model's (run.py asserts it).

The spec is a plain dict (no jax import), built by `spec_from_config` in the
parent process:
  width, depth, num_heads, mlp_dim, patch_size, image_size, num_classes,
  train_batch, infer_batch, latency_images, steps, reps, warmup,
  lr, b1, b2, eps, weight_decay, grad_clip, dtype ('float32'|'bfloat16'),
  device ('cpu'|'gpu').
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from benchmarks import common


def spec_from_config(config, suite) -> dict:
  """Torch spec of the ViT in `config` (a trainer ConfigDict)."""
  from adaptive_vision.models import vit as vit_lib
  m = config.model
  dims = vit_lib.decode_variant(m.get("variant"), width=m.get("width"), depth=m.get("depth"),
                                num_heads=m.get("num_heads"), mlp_dim=m.get("mlp_dim"),
                                patch_size=m.get("patch_size"))
  if m.get("pool", "token") != "token":
    raise ValueError("the torch peer implements pool='token' only")
  if m.get("dropout", 0.0):
    raise ValueError("the torch peer has no dropout; the benchmark configs set it to 0")
  o = config.optim
  if o.get("name", "adamw") != "adamw":
    raise ValueError("the torch peer implements AdamW only")
  return dict(
      dims, image_size=int(m.image_size), num_classes=int(m.num_classes),
      stochastic_depth=float(m.get("stochastic_depth") or 0.0),
      train_batch=int(suite.train_batch), infer_batch=int(suite.infer_batch),
      latency_images=int(suite.latency_images), steps=int(suite.train_steps_per_rep),
      reps=int(suite.reps), warmup=int(suite.warmup),
      lr=float(o.lr), b1=float(o.get("b1", 0.9)), b2=float(o.get("b2", 0.999)),
      eps=float(o.get("eps", 1e-8)), weight_decay=float(o.get("weight_decay", 0.0)),
      grad_clip=float(o.get("grad_clip") or 0.0),
      warmup_fraction=float(o.get("warmup_fraction") or 0.0),
      warmup_steps=int(o.get("warmup_steps") or 0),
      dtype=str(m.get("dtype") or "float32"), device="cpu")


def build(spec: dict):
  """The torch.nn.Module of `spec` (torch is imported here)."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  width, heads = spec["width"], spec["num_heads"]
  p = spec["patch_size"]
  grid = spec["image_size"] // p

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.qkv = nn.Linear(width, 3 * width)
      self.out = nn.Linear(width, width)

    def forward(self, x):
      b, n, c = x.shape
      qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
      y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
      return self.out(y.transpose(1, 2).reshape(b, n, c))

  def drop_path(x, rate: float, training: bool):
    """Stochastic depth as vit._drop_path: drops the residual branch per example."""
    if not training or rate == 0.0:
      return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < 1.0 - rate
    return torch.where(keep, x / (1.0 - rate), torch.zeros_like(x))

  class Block(nn.Module):
    def __init__(self, rate: float = 0.0):
      super().__init__()
      self.rate = rate
      self.norm1 = nn.LayerNorm(width, eps=1e-6)
      self.attn = Attention()
      self.norm2 = nn.LayerNorm(width, eps=1e-6)
      self.mlp = nn.Sequential(nn.Linear(width, spec["mlp_dim"]), nn.GELU(approximate="tanh"),
                               nn.Linear(spec["mlp_dim"], width))

    def forward(self, x):
      x = x + drop_path(self.attn(self.norm1(x)), self.rate, self.training)
      return x + drop_path(self.mlp(self.norm2(x)), self.rate, self.training)

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      self.embedding = nn.Conv2d(3, width, p, stride=p)
      self.pos_embedding = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
      self.cls = nn.Parameter(torch.zeros(1, 1, width))
      depth, sd = spec["depth"], spec.get("stochastic_depth", 0.0)
      # linear ramp to `sd` at the last block, as flax's ViT
      self.blocks = nn.ModuleList(Block(sd * i / max(depth - 1, 1)) for i in range(depth))
      self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, spec["num_classes"])
      nn.init.zeros_(self.head.weight)
      nn.init.zeros_(self.head.bias)

    def forward(self, images):  # [B, 3, H, W] (torch's native layout)
      x = self.embedding(images).flatten(2).transpose(1, 2) + self.pos_embedding
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
      for block in self.blocks:
        x = block(x)
      return self.head(self.encoder_norm(x)[:, 0])

  return ViT()


def load_flax_params(model, params) -> None:
  """Copies a flax ViT's params into the torch peer (for the equivalence test)."""
  import numpy as np
  import torch

  def t(x):
    return torch.from_numpy(np.array(x, dtype=np.float32))

  def dense(linear, p, in_axes: int = 1):
    """flax kernel [*in_dims, *out_dims] -> torch weight [out, in]."""
    kernel = np.asarray(p["kernel"])
    n_in = int(np.prod(kernel.shape[:in_axes]))
    linear.weight.data = t(kernel.reshape(n_in, -1).T)
    linear.bias.data = t(np.asarray(p["bias"]).reshape(-1))

  def norm(ln, p):
    ln.weight.data, ln.bias.data = t(p["scale"]), t(p["bias"])

  model.embedding.weight.data = t(np.transpose(np.asarray(params["embedding"]["kernel"]),
                                               (3, 2, 0, 1)))
  model.embedding.bias.data = t(params["embedding"]["bias"])
  model.pos_embedding.data = t(params["pos_embedding"])
  model.cls.data = t(params["cls"])
  for i, block in enumerate(model.blocks):
    p = params[f"block{i}"]
    norm(block.norm1, p["norm1"])
    norm(block.norm2, p["norm2"])
    dense(block.attn.qkv, p["attn"]["qkv"])   # [C, 3, H, hd] -> [3C, C]
    dense(block.attn.out, p["attn"]["out"], in_axes=2)  # [H, hd, C] -> [C, C]
    dense(block.mlp[0], p["mlp"]["Dense_0"])
    dense(block.mlp[2], p["mlp"]["Dense_1"])
  norm(model.encoder_norm, params["encoder_norm"])
  dense(model.head, params["head"])


def parameter_count(spec: dict) -> int:
  return int(sum(p.numel() for p in build(spec).parameters()))


def _lr_lambda(spec: dict, total_steps: int = 10_000):
  warmup = spec.get("warmup_steps") or int(round(spec["warmup_fraction"] * total_steps))
  warmup = min(warmup, total_steps - 1)

  def f(step):
    if step < warmup:
      return step / max(warmup, 1)
    t = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
  return f


def _setup(spec: dict):
  import torch
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  device = "cuda" if spec.get("device") == "gpu" and torch.cuda.is_available() else "cpu"
  model = build(spec).to(device)
  decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
  decay_ids = {id(p) for p in decay}
  no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"])
  sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec))
  return torch, model, opt, sched, device


def _autocast(torch, spec, device):
  import contextlib
  if spec["dtype"] == "bfloat16":
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def _sync(torch, device):
  if device == "cuda":
    torch.cuda.synchronize()


def _train_step(spec: dict, *, compile: bool = False):
  """(train_step, torch, model, device, fwd, gen): one AdamW step of the peer on a
  fixed random batch, as the JAX benchmark times its step on a device batch."""
  import torch.nn.functional as F
  torch, model, opt, sched, device = _setup(spec)
  s = spec["image_size"]
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(spec["train_batch"], 3, s, s, generator=gen).to(device)
  y = torch.randint(0, spec["num_classes"], (spec["train_batch"],), generator=gen).to(device)
  params = list(model.parameters())
  fwd = torch.compile(model) if compile else model

  def train_step():
    opt.zero_grad(set_to_none=True)
    with _autocast(torch, spec, device):
      logits = fwd(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    if spec["grad_clip"]:
      grad_norm = torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
    else:
      grad_norm = torch.linalg.vector_norm(torch.stack(
          [torch.linalg.vector_norm(p.grad) for p in params]))
    opt.step()
    sched.step()
    with torch.no_grad():
      accuracy = (logits.argmax(-1) == y).float().mean()
      param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)))
    return loss, grad_norm, accuracy, param_norm

  return train_step, torch, model, device, gen


def serve(spec: dict, stdin, stdout) -> None:
  """Train steps on request, for paired timing against JAX (`benchmarks.run paired`):
  prints `TORCH_READY` after two warm-up steps, then for each line `N` on
  stdin runs N steps and prints `TORCH_SECONDS <wall seconds>`; `quit` ends."""
  train_step, torch, model, device, _ = _train_step(spec)
  model.train()

  def finish(out):
    float(out[0].item())
    _sync(torch, device)

  common.serve_steps(train_step, finish, stdin, stdout)


def measure(spec: dict, *, compile: bool = False, train: bool = True,
            inference: bool = True) -> dict[str, Any]:
  """Train and inference timings of the peer, eager or torch.compile'd."""
  train_step, torch, model, device, gen = _train_step(spec, compile=compile)
  s = spec["image_size"]
  params = list(model.parameters())
  out: dict[str, Any] = {
      "mode": "compile" if compile else "eager", "device": device,
      "threads": torch.get_num_threads(), "torch": torch.__version__,
      "params": int(sum(p.numel() for p in params)),
      "optimizer": "torch.optim.AdamW (foreach default)",
  }

  if train:
    model.train()
    start = time.perf_counter()
    loss = train_step()[0]
    loss.item()
    _sync(torch, device)
    out["first_step_s"] = time.perf_counter() - start  # includes compilation

    def rep():
      last = None
      for _ in range(spec["steps"]):
        last = train_step()
      float(last[0].item())
      _sync(torch, device)

    t = common.repeat(rep, reps=spec["reps"], warmup=spec["warmup"])
    out["train"] = dict(t, images_per_s=spec["train_batch"] * spec["steps"] / t["median_s"],
                        steps_per_rep=spec["steps"], batch=spec["train_batch"],
                        final_loss=float(loss.item()))

  if inference:
    model.eval()
    infer = torch.compile(model, dynamic=False) if compile else model
    xb = torch.randn(spec["infer_batch"], 3, s, s, generator=gen).to(device)
    singles = [torch.randn(1, 3, s, s, generator=gen).to(device)
               for _ in range(spec["latency_images"])]

    def run(inp):
      with torch.inference_mode(), _autocast(torch, spec, device):
        r = infer(inp)
      _sync(torch, device)
      return r

    start = time.perf_counter()
    run(xb)
    out["first_inference_s"] = time.perf_counter() - start
    t = common.repeat(lambda: run(xb), reps=spec["reps"], warmup=spec["warmup"])
    out["inference"] = dict(t, images_per_s=spec["infer_batch"] / t["median_s"],
                            batch=spec["infer_batch"])
    run(singles[0])  # compiles batch 1
    lat = []
    for _ in range(max(1, spec["reps"])):
      for img in singles:
        start = time.perf_counter()
        run(img)
        lat.append(time.perf_counter() - start)
    out["latency"] = dict(common.summarize(lat), batch=1)
    del out["latency"]["times_s"]
  return out


def train_memory(spec: dict, steps: int) -> dict[str, Any]:
  """Peak RSS of eager training at the benchmark batch (run in its own process)."""
  import torch.nn.functional as F  # noqa: F401 (imports torch before the baseline)
  base = common.peak_rss_bytes()
  torch, model, opt, sched, device = _setup(spec)
  s = spec["image_size"]
  x = torch.randn(spec["train_batch"], 3, s, s, device=device)
  y = torch.randint(0, spec["num_classes"], (spec["train_batch"],), device=device)
  for _ in range(max(1, steps)):
    opt.zero_grad(set_to_none=True)
    with _autocast(torch, spec, device):
      loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"] or float("inf"))
    opt.step()
    sched.step()
  loss.item()
  out = dict(common.peak_rss_bytes(), steps=steps, rss_after_import_bytes=base["rss_now_bytes"],
             peak_after_import_bytes=base["peak_rss_bytes"])
  if device == "cuda":
    out["gpu_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
  return out
