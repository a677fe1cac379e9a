"""Section `train`: our jitted train steps against PyTorch eager, paired.

Every variant runs in a process of its own, set up as its launcher sets it
up, and takes `steps` train steps per round on a synthetic batch already in
place; the parent (no JAX backend) alternates them (`common.rounds`):

  teacher        ERDE teacher (configs/erde_cifar10.py:role=teacher, ResNet-20 and
                 two exit heads), `train.build`'s step, as `launch.train` runs it
  student        ERDE student (ResNet-8, the ERDE loss, the published teacher's
                 forward inside the step: teacher_cache off)
  vit            the CIFAR ViT (configs/vit_cifar10.py), one device
  vit_devices4   the same, batch over 4 host devices (`launch.train --cpu_devices=4`)
  teacher_plain  a plain process: `backend.setup()`, `models.build(cfg, layers=be.layers)`
                 and its own step (cross entropy on every exit, SGD with Nesterov,
                 weight decay, clipping; optax) under a plain `jax.jit`
  *_torch        the PyTorch eager peers (benchmarks/torch_resnet.py, torch_vit.py)

    python -m benchmarks.train '<spec>'   one JAX variant's process (common.Child)
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np

from benchmarks import common

# (figure, ours, baseline): the baseline's step time over ours, per round.
PAIRS = (("resnet_train_speedup_vs_torch_eager", "teacher", "teacher_torch"),
         ("erde_student_train_speedup_vs_torch_eager", "student", "student_torch"),
         ("vit_train_speedup_vs_torch_eager", "vit", "vit_torch"),
         ("vit_devices4_train_speedup_vs_torch_eager", "vit_devices4", "vit_torch"),
         ("plain_process_over_launcher", "teacher_plain", "teacher"))


def _configs(batch: int, teacher_params: str) -> dict:
  from configs import erde_cifar10, vit_cifar10
  out = {"teacher": erde_cifar10.get_config("role=teacher"),
         "student": erde_cifar10.get_config("loss=erde,teacher_cache="),
         "vit": vit_cifar10.get_config()}
  out["student"].teacher.checkpoint = teacher_params
  for c in out.values():
    c.batch_size = batch
  return out


def measure(cfg) -> dict:
  from benchmarks import torch_resnet, torch_vit
  c = cfg.train
  configs = _configs(c.batch, cfg.params.teacher)
  jax_spec = lambda model, devices=1, plain=False: ("benchmarks.train", dict(
      model=model, batch=c.batch, teacher=cfg.params.teacher, devices=devices, plain=plain))
  specs = {"teacher": jax_spec("teacher"), "student": jax_spec("student"),
           "vit": jax_spec("vit"), "vit_devices4": jax_spec("vit", devices=4),
           "teacher_plain": jax_spec("teacher", plain=True),
           "teacher_torch": ("benchmarks.torch_resnet",
                             torch_resnet.spec_from_config(configs["teacher"], c.batch)),
           "student_torch": ("benchmarks.torch_resnet",
                             torch_resnet.spec_from_config(configs["student"], c.batch)),
           "vit_torch": ("benchmarks.torch_vit",
                         torch_vit.spec_from_config(configs["vit"], c.batch))}
  children = {name: common.Child(module, dict(spec, name=name))
              for name, (module, spec) in specs.items()}
  try:
    info = {name: child.ready() for name, child in children.items()}
    common.log("every variant compiled and warm")
    for _, ours, base in PAIRS:
      if info[ours]["params"] != info[base]["params"]:
        raise AssertionError(f"{ours} has {info[ours]['params']} parameters, {base} "
                             f"{info[base]['params']}: not the same network")
    times = common.rounds(list(children), lambda n: children[n](c.steps) / c.steps, c.rounds)
  finally:
    for child in children.values():
      child.close()
  step_s = common.medians(times)
  comparisons = {fig: dict(common.speedup(times, base, ours), what=f"{ours} over {base}")
                 for fig, ours, base in PAIRS}
  return {"settings": c.to_dict(),
          "variants": {n: dict(info[n], step_s=t, images_per_s=c.batch / t)
                       for n, t in step_s.items()},
          "comparisons": comparisons,
          "figures": {fig: v["median"] for fig, v in comparisons.items()}}


# ----------------------------------------------------------------------------
# One JAX variant's process


def _launcher_step(config, x, y):
  """`train.build`'s step on a process set up as `launch.train` sets it up."""
  import jax
  from adaptive_vision import sharding as shd
  from adaptive_vision.train import build
  from adaptive_vision.train.state import param_count
  trainer = build.build(config, total_steps=10_000)
  state = [trainer.init_state()]
  batch = shd.global_batch({"image": x, "label": y}, trainer.mesh)

  def step():
    state[0], metrics = trainer.train_step(state[0], batch, trainer.teacher_variables)
    return metrics
  return step, {"params": param_count(state[0].params), "devices": int(jax.device_count()),
                "backend": trainer.backend.describe()}


def _plain_step(config, x, y):
  """What a program of one's own does (README): backend.setup, the model, a plain jax.jit."""
  import jax
  import optax
  from adaptive_vision import backend, models
  be = backend.setup()
  model = models.build(config.model, layers=be.layers)
  variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.PRNGKey(0))
  o = config.optim
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                   optax.add_decayed_weights(o.weight_decay),
                   optax.sgd(o.lr, momentum=o.momentum, nesterov=o.nesterov))

  def loss_fn(params, stats, x, y, rng):
    (exits, _), new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"], rngs={"dropout": rng})
    return sum(optax.softmax_cross_entropy_with_integer_labels(e, y).mean()
               for e in exits), new["batch_stats"]

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, x, y):
    params, stats, opt_state, rng = state
    rng, key = jax.random.split(rng)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state, rng), loss

  params = variables["params"]
  state = [(params, variables["batch_stats"], tx.init(params), jax.random.PRNGKey(1))]
  x, y = jax.device_put(x), jax.device_put(y)

  def step():
    state[0], loss = train_step(state[0], x, y)
    return loss
  return step, {"params": int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
                "devices": int(jax.device_count()), "backend": be.describe()}


def _child(spec: dict) -> None:
  if not spec["plain"]:  # the plain process calls backend.setup() itself
    from adaptive_vision import backend
    backend.prepare_process("train", cpu_devices=spec["devices"] if spec["devices"] > 1 else 0)
  import jax
  jax.config.update("jax_threefry_partitionable", True)  # as launch.common.setup
  config = _configs(spec["batch"], spec["teacher"])[spec["model"]]
  rng = np.random.default_rng(0)
  s, n = config.data.image_size, spec["batch"]
  x = rng.normal(size=(n, s, s, 3)).astype(np.float32)
  y = rng.integers(0, config.model.num_classes, n).astype(np.int32)
  step, info = (_plain_step if spec["plain"] else _launcher_step)(config, x, y)
  common.serve(step, jax.block_until_ready, info)


if __name__ == "__main__":
  _child(json.loads(sys.argv[1]))
