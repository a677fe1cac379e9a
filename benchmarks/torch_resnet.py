"""The PyTorch peer of the ERDE CNNs: adaptive_vision.models.resnet in eager torch.

Same architecture, layer for layer: 3x3 stem conv (no bias) + BatchNorm +
ReLU; 3 stages of basic blocks (16/32/64 channels times the width multiplier,
strides 1/2/2, option-B 1x1 projection shortcuts); ERDE exit heads (BatchNorm,
ReLU, 2x2 average pool, dropout 0.5, Linear) after the blocks listed in
`exits`; global average pool + Linear. BatchNorm momentum 0.1 (= flax 0.9),
eps 1e-5. Channels-last memory layout (faster for oneDNN on CPU).

Two steps, as the JAX trainer runs them:
* `teacher` (role 'teacher'): cross entropy on every exit, SGD + Nesterov,
  weight decay, clipping by global norm;
* `student` (role 'student'): the student's ERDE loss (CE + T^2 KD where the
  teacher's exit is right + entropy term where it is wrong) with the frozen
  teacher's forward pass in eval mode under no_grad, on the same batch.

`serve(spec)` runs steps on request for paired rounds (`benchmarks.run cnn`).
`parameter_count` must equal the flax model's (`benchmarks.run cnn` asserts it).
"""

from __future__ import annotations

import math
import os

from benchmarks import common


def spec_from_config(config, batch: int) -> dict:
  """Torch spec of an ERDE config (teacher or student) at a given batch."""
  def net(m):
    return dict(depth=int(m.depth), width=int(m.width),
                width_multiplier=float(m.width_multiplier),
                exits=[int(e) for e in m.exits], num_classes=int(m.num_classes),
                exit_dropout=float(m.exit_dropout))
  spec = dict(model=net(config.model), batch=batch, lr=float(config.optim.lr),
              weight_decay=float(config.optim.weight_decay),
              grad_clip=float(config.optim.grad_clip or 0.0), role="teacher")
  if config.get("teacher"):
    spec.update(role="student", teacher=net(config.teacher.model),
                temperature=float(config.loss.temperature),
                kd_weight=float(config.loss.kd_weight),
                entropy_weight=float(config.loss.entropy_weight))
  return spec


def build(m: dict):
  import torch
  from torch import nn

  def widths():
    return [max(1, int(round(m["width"] * m["width_multiplier"] * 2 ** s))) for s in range(3)]

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False),
                                  nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu((x if self.proj is None else self.proj(x)) + y)

  class ExitHead(nn.Module):
    def __init__(self, c, size):
      super().__init__()
      self.bn = nn.BatchNorm2d(c, momentum=0.1, eps=1e-5)
      self.drop = nn.Dropout(m["exit_dropout"])
      pooled = size // 2 if size >= 2 else size
      self.fc = nn.Linear(c * pooled * pooled, m["num_classes"])
      self.pool = size >= 2

    def forward(self, x):
      x = torch.relu(self.bn(x))
      if self.pool:
        x = nn.functional.avg_pool2d(x, 2)
      # NHWC flatten order, as the flax head (only the order of weights differs).
      return self.fc(self.drop(x.permute(0, 2, 3, 1).flatten(1)))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      n = (m["depth"] - 2) // 6
      w = widths()
      self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False),
                                nn.BatchNorm2d(w[0], momentum=0.1, eps=1e-5), nn.ReLU())
      blocks, heads, c, size = [], {}, w[0], 32
      for i in range(3 * n):
        stride = 2 if i % n == 0 and i > 0 else 1
        blocks.append(Block(c, w[i // n], stride))
        c, size = w[i // n], size // stride
        if i in m["exits"]:
          heads[str(i)] = ExitHead(c, size)
      self.blocks = nn.ModuleList(blocks)
      self.heads = nn.ModuleDict(heads)
      self.fc = nn.Linear(c, m["num_classes"])

    def forward(self, x):
      x = self.stem(x)
      outs = []
      for i, block in enumerate(self.blocks):
        x = block(x)
        if str(i) in self.heads:
          outs.append(self.heads[str(i)](x))
      outs.append(self.fc(x.mean((2, 3))))
      return outs

  return ResNet().to(memory_format=torch.channels_last)


def parameter_count(m: dict) -> int:
  return sum(p.numel() for p in build(m).parameters())


def _train_step(spec: dict):
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = build(spec["model"])
  model.train()
  teacher = None
  if spec["role"] == "student":
    teacher = build(spec["teacher"])
    teacher.eval()
    for p in teacher.parameters():
      p.requires_grad_(False)
  opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9, nesterov=True,
                        weight_decay=spec["weight_decay"])
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(spec["batch"], 3, 32, 32, generator=gen).contiguous(
      memory_format=torch.channels_last)
  y = torch.randint(0, spec["model"]["num_classes"], (spec["batch"],), generator=gen)
  params = list(model.parameters())

  def loss_of(outs, t_outs):
    if t_outs is None:
      return sum(F.cross_entropy(o, y) for o in outs)
    temp, k = spec["temperature"], spec["model"]["num_classes"]
    total = 0.0
    for s, t in zip(outs, t_outs[len(t_outs) - len(outs):]):
      right = (t.argmax(-1) == y).float()
      kl = (F.softmax(t / temp, -1) * (F.log_softmax(t / temp, -1)
                                       - F.log_softmax(s / temp, -1))).sum(-1)
      logp = F.log_softmax(s, -1)
      ent = -(logp.exp() * logp).sum(-1)
      total = total + F.cross_entropy(s, y) \
          + spec["kd_weight"] * temp ** 2 * (kl * right).mean() \
          + spec["entropy_weight"] * ((math.log(k) - ent) * (1 - right)).mean()
    return total

  def step():
    t_outs = None
    if teacher is not None:
      with torch.no_grad():
        t_outs = teacher(x)
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model(x), t_outs)
    loss.backward()
    if spec["grad_clip"]:
      torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
    opt.step()
    return loss

  return step


def serve(spec: dict, stdin, stdout) -> None:
  """Steps on request (see torch_vit.serve): `TORCH_READY`, then per line `N`
  runs N steps and prints `TORCH_SECONDS <wall seconds>`; `quit` ends."""
  common.serve_steps(_train_step(spec), lambda loss: float(loss.item()), stdin, stdout)
