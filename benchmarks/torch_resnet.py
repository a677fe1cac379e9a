"""The PyTorch peer of the ERDE CNNs: adaptive_vision.models.resnet in eager torch.

Layer for layer: 3x3 stem conv (no bias) + BatchNorm + ReLU; 3 stages of
basic blocks (16/32/64 channels times the width multiplier, strides 1/2/2,
1x1 projection shortcuts); ERDE exit heads (BatchNorm, ReLU, 2x2 average
pool, dropout, Linear on the NHWC-flattened map) after the blocks in
`exits`; global average pool + Linear. BatchNorm momentum 0.1 (= flax 0.9),
eps 1e-5; channels-last memory. The steps are the trainer's: the teacher
(cross entropy on every exit) and the student (the ERDE loss, with the
frozen teacher's forward on the same batch), SGD + Nesterov, weight decay,
clipping by global norm.

    python -m benchmarks.torch_resnet '<spec>'   train steps on request (common.Child)
"""

from __future__ import annotations

import json
import math
import sys

from benchmarks import common


def spec_from_config(config, batch: int) -> dict:
  def net(m):
    return dict(depth=int(m.depth), width=int(m.width), width_multiplier=float(m.width_multiplier),
                exits=[int(e) for e in m.exits], num_classes=int(m.num_classes),
                exit_dropout=float(m.exit_dropout))
  o = config.optim
  spec = dict(model=net(config.model), batch=batch, lr=float(o.lr),
              weight_decay=float(o.weight_decay), grad_clip=float(o.grad_clip or 0.0))
  if config.get("teacher"):
    spec.update(teacher=net(config.teacher.model), temperature=float(config.loss.temperature),
                kd_weight=float(config.loss.kd_weight),
                entropy_weight=float(config.loss.entropy_weight))
  return spec


def build(m: dict):
  import torch
  from torch import nn
  bn = lambda c: nn.BatchNorm2d(c, momentum=0.1, eps=1e-5)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn(cout)
      self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn(cout)
      self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), bn(cout))
                   if stride != 1 or cin != cout else None)

    def forward(self, x):
      y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
      return torch.relu((x if self.proj is None else self.proj(x)) + y)

  class ExitHead(nn.Module):
    def __init__(self, c, size):
      super().__init__()
      self.bn, self.drop, self.pool = bn(c), nn.Dropout(m["exit_dropout"]), size >= 2
      pooled = size // 2 if self.pool else size
      self.fc = nn.Linear(c * pooled * pooled, m["num_classes"])

    def forward(self, x):
      x = torch.relu(self.bn(x))
      x = nn.functional.avg_pool2d(x, 2) if self.pool else x
      return self.fc(self.drop(x.permute(0, 2, 3, 1).flatten(1)))  # NHWC order, as flax

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      n = (m["depth"] - 2) // 6
      w = [max(1, int(round(m["width"] * m["width_multiplier"] * 2 ** s))) for s in range(3)]
      self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), bn(w[0]), nn.ReLU())
      blocks, heads, c, size = [], {}, w[0], 32
      for i in range(3 * n):
        stride = 2 if i % n == 0 and i > 0 else 1
        blocks.append(Block(c, w[i // n], stride))
        c, size = w[i // n], size // stride
        if i in m["exits"]:
          heads[str(i)] = ExitHead(c, size)
      self.blocks, self.heads = nn.ModuleList(blocks), nn.ModuleDict(heads)
      self.fc = nn.Linear(c, m["num_classes"])

    def forward(self, x):
      x, outs = self.stem(x), []
      for i, block in enumerate(self.blocks):
        x = block(x)
        if str(i) in self.heads:
          outs.append(self.heads[str(i)](x))
      return outs + [self.fc(x.mean((2, 3)))]

  return ResNet().to(memory_format=torch.channels_last)


def train_step(spec: dict):
  import torch
  import torch.nn.functional as F
  torch.manual_seed(0)
  model = build(spec["model"]).train()
  teacher = build(spec["teacher"]).eval().requires_grad_(False) if "teacher" in spec else None
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
    temp, k, total = spec["temperature"], spec["model"]["num_classes"], 0.0
    for s, t in zip(outs, t_outs[len(t_outs) - len(outs):]):
      right = (t.argmax(-1) == y).float()
      kl = (F.softmax(t / temp, -1) * (F.log_softmax(t / temp, -1)
                                       - F.log_softmax(s / temp, -1))).sum(-1)
      logp = F.log_softmax(s, -1)
      entropy = -(logp.exp() * logp).sum(-1)
      total = total + F.cross_entropy(s, y) + spec["kd_weight"] * temp ** 2 * (kl * right).mean() \
          + spec["entropy_weight"] * ((math.log(k) - entropy) * (1 - right)).mean()
    return total

  def step():
    with torch.no_grad():
      t_outs = teacher(x) if teacher is not None else None
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model(x), t_outs)
    loss.backward()
    if spec["grad_clip"]:
      torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
    opt.step()
    return loss

  return step, model


if __name__ == "__main__":
  common.serve_torch(train_step, json.loads(sys.argv[1]))
