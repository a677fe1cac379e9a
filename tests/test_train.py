"""Trainer: sharded step equals single-device step, runlocal run, exact resume, bad input."""

import json
import os
import re

import flax
import jax
import ml_collections
import numpy as np
import pytest

from adaptive_vision import losses, models
from adaptive_vision import sharding as shd
from adaptive_vision.train import build, loop, optim
from adaptive_vision.train.metrics import read_metrics
from configs import ravit_cifar10, vit_cifar10


def tiny_config(**overrides):
  c = vit_cifar10.get_config("runlocal")
  c.data.synthetic_train_size = 256
  c.data.synthetic_test_size = 64
  c.data.val_size = 64
  c.data.image_size = 16
  c.model.image_size = 16
  c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4)
  c.batch_size = 16
  c.eval_batch_size = 64
  c.total_steps = 12
  c.log_every = 1
  c.checkpoint_every = 4
  c.async_checkpoints = True
  for k, v in overrides.items():
    c[k] = v
  return c


def _setup_state(c, mesh):
  trainer = build.build(c, mesh, total_steps=100)
  return trainer.init_state(jax.random.PRNGKey(0)), trainer.train_step


@pytest.mark.parametrize("strategy", ["replicate", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(strategy):
  assert jax.device_count() == 8, "conftest fakes 8 CPU devices"
  c = tiny_config(param_sharding=strategy)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  results = []
  for n in (1, 8):
    mesh = shd.make_mesh(dict(data=n, model=1))
    state, step = _setup_state(c, mesh)
    for _ in range(2):
      state, metrics = step(state, shd.global_batch(batch, mesh), None)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  (p1, l1), (p8, l8) = results
  assert l1 == pytest.approx(l8, rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_train_step_loss_is_the_public_erde_loss():
  """The step runs losses.erde_loss itself (chosen by config.loss.name), on the
  model's tuple of exits and the teacher's matched exits; the entropy weight
  comes from the base config."""
  c = tiny_config()
  c.model = dict(name="ee_vit", num_classes=10, image_size=16, width=32, depth=2,
                 num_heads=2, mlp_dim=64, patch_size=4, exits=(0,), head_zero_init=False)
  c.loss.update(name="erde", temperature=2.0, kd_weight=0.7)
  teacher_cfg = dict(c.model, name="vit", depth=1)
  del teacher_cfg["exits"]
  c.teacher = ml_collections.ConfigDict(dict(model=teacher_cfg, checkpoint=None))
  teacher = models.build(c.teacher.model)
  teacher_vars = teacher.init(jax.random.PRNGKey(1), models.dummy_inputs(c.teacher.model))
  # The trainer's own assembly, with the teacher's variables given directly.
  trainer = build.build(c, total_steps=100, teacher_variables=teacher_vars)
  model, state = trainer.model, trainer.init_state(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  before = jax.device_get(state)  # the step donates its state
  _, metrics = trainer.train_step(state, shd.global_batch(batch, trainer.mesh),
                                  trainer.teacher_variables)
  state = before

  exits, _ = model.apply({"params": state.params}, batch["image"], train=True,
                         rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
  teacher_exits, _ = teacher.apply(teacher_vars, batch["image"], train=False)
  assert isinstance(exits, tuple) and len(exits) == 2 and len(teacher_exits) == 1
  want = losses.erde_loss(exits, (teacher_exits[0],) * 2, batch["label"],
                          temperature=2.0, kd_weight=0.7, entropy_weight=0.5)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
  assert c.loss.entropy_weight == 0.5 and float(metrics["entropy/exit0"]) > 0
  assert {"ce/exit1", "kd/exit1", "entropy/exit1", "teacher_correct/exit1",
          "accuracy/exit1", "teacher_correct", "grad_norm", "lr"} <= set(metrics)


def test_missing_config_key_is_a_one_line_error(tmp_path):
  c = tiny_config()
  del c["mesh"]
  with pytest.raises(ValueError, match=r"^config key mesh is missing; configs start from "
                     r"configs\.common\.base_config\(\)"):
    loop.validate_config(c, str(tmp_path / "w"))
  c = tiny_config()
  del c.optim["eps"]
  with pytest.raises(ValueError, match=r"^config key optim\.eps is missing;"):
    optim.make_optimizer(c.optim, 10)
  c = tiny_config()
  del c.data["source"]
  with pytest.raises(ValueError, match=r"^config key data\.source is missing;") as e:
    loop.train_and_evaluate(c, str(tmp_path / "w2"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w2")


@pytest.mark.slow
def test_runlocal_writes_checkpoint_metrics_and_logits(tmp_path):
  c = tiny_config()
  workdir = str(tmp_path / "run")
  summary = loop.train_and_evaluate(c, workdir)
  assert summary["step"] == 12
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert ckpts[-1] == 12
  train = read_metrics(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, 13))
  assert all(np.isfinite(r["loss"]) for r in train)
  evals = read_metrics(workdir, "eval")
  assert {r["split"] for r in evals} == {"val", "test"}
  assert os.path.exists(os.path.join(workdir, "config.json"))
  with np.load(os.path.join(workdir, "test_logits.npz")) as f:
    assert f["exit_logits"].shape == (1, 64, 10) and f["labels"].shape == (64,)
    np.testing.assert_allclose(f["exit_macs"], models.exit_macs(c.model))


@pytest.mark.slow
def test_stopped_and_restarted_run_reproduces_losses_exactly(tmp_path):
  c = tiny_config()
  full = str(tmp_path / "full")
  loop.train_and_evaluate(c, full)
  split = str(tmp_path / "split")
  c_stop = tiny_config(stop_at_step=6)
  out = loop.train_and_evaluate(c_stop, split)
  assert out["step"] == 6 and out.get("stopped_early")
  loop.train_and_evaluate(tiny_config(), split)  # the same command again resumes
  a = {r["step"]: r["loss"] for r in read_metrics(full, "train")}
  b = {r["step"]: r["loss"] for r in read_metrics(split, "train")}
  assert sorted(b) == list(range(1, 13))
  assert a == b  # bitwise equal losses: same data order, same params, same rngs
  fa = np.load(os.path.join(full, "test_logits.npz"))["exit_logits"]
  fb = np.load(os.path.join(split, "test_logits.npz"))["exit_logits"]
  np.testing.assert_array_equal(fa, fb)


@pytest.mark.slow
def test_ravit_runlocal_trains_two_exits(tmp_path):
  c = ravit_cifar10.get_config("runlocal")
  c.data.synthetic_train_size = 128
  c.data.synthetic_test_size = 32
  c.data.val_size = 32
  c.batch_size = 16
  c.total_steps = 3
  summary = loop.train_and_evaluate(c, str(tmp_path / "ravit"))
  with np.load(str(tmp_path / "ravit" / "test_logits.npz")) as f:
    assert f["exit_logits"].shape == (2, 32, 10)
    assert f["exit_macs"][0] < f["exit_macs"][1]
  assert "accuracy/exit1" in summary["test"]


@pytest.mark.slow
def test_nan_stops_with_message_and_keeps_checkpoint(tmp_path):
  c = tiny_config()
  c.optim.lr = 1e30
  c.optim.grad_clip = 0.0
  c.optim.warmup_fraction = 0.0
  c.optim.schedule = "constant"
  with pytest.raises(loop.NonFiniteError, match=r"step \d+: .*non-finite"):
    loop.train_and_evaluate(c, str(tmp_path / "nan"))


def test_bad_input_fails_before_compiling(tmp_path):
  c = tiny_config()
  c.model.image_size = 18
  c.data.image_size = 18
  with pytest.raises(ValueError, match="not divisible by patch size"):
    loop.validate_config(c, str(tmp_path / "w"))
  c = tiny_config()
  c.data.source = "tfds"
  c.data.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    loop.train_and_evaluate(c, str(tmp_path / "w2"))


def test_workdir_parents_are_made_and_bad_workdirs_are_one_line_errors(tmp_path, monkeypatch):
  # Missing parents (runs/ in a fresh clone) are fine; the check creates nothing.
  loop.validate_config(tiny_config(), str(tmp_path / "runs" / "deeper" / "w"))
  assert not os.path.exists(tmp_path / "runs")
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ValueError, match=r"^--workdir is a file, not a directory: .*afile;"):
    loop.validate_config(tiny_config(), str(tmp_path / "afile"))
  with pytest.raises(ValueError, match=r"^a parent of --workdir is a file, not a directory"):
    loop.validate_config(tiny_config(), str(tmp_path / "afile" / "runs" / "w"))
  # (os.access stands in for a read-only folder: root may write anywhere.)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path)
                      else real_access(p, mode))
  with pytest.raises(ValueError, match="^the folder to create --workdir in is not writable: "
                     + re.escape(f"{tmp_path};")):
    loop.validate_config(tiny_config(), str(tmp_path / "runs" / "w"))


@pytest.mark.slow
def test_workdir_of_another_model_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  c = tiny_config(total_steps=4)
  loop.train_and_evaluate(c, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  other = tiny_config(total_steps=4)
  other.model.width = 48
  with pytest.raises(ValueError, match="different model"):
    loop.train_and_evaluate(other, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_a_workdir_from_before_the_workdir_lock_keys_resumes(tmp_path):
  """workdir_lock.* is operational: a run whose config.json predates it resumes."""
  c = tiny_config()
  old = json.loads(c.to_json_best_effort())
  del old["workdir_lock"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  c.workdir_lock.lease_seconds = 600.0
  loop.check_same_recipe(c, str(tmp_path))  # no "another recipe" refusal


@pytest.mark.slow
def test_resume_with_another_recipe_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config(stop_at_step=4), workdir)
  changed = tiny_config(total_steps=20)
  with pytest.raises(ValueError, match="another recipe.*total_steps: 12 -> 20"):
    loop.train_and_evaluate(changed, workdir)
  # Operational keys may change (here: logging cadence and the stop step).
  out = loop.train_and_evaluate(tiny_config(log_every=2, stop_at_step=8), workdir)
  assert out["step"] == 8


@pytest.mark.slow
def test_launcher_cpu_devices_splits_the_host(tmp_path):
  """`launch.train --cpu_devices=N` (via launch.common.setup) gives N CPU devices,
  which the trainer's default mesh then shards the batch over."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("from launch import common; common.setup(cpu_devices=3); import jax; "
          "from adaptive_vision import sharding; "
          "print(jax.device_count(), sharding.make_mesh().shape['data'])")
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-2:] == ["3", "3"]
  bad = subprocess.run([sys.executable, "-c", "from launch import common; "
                        "common.setup(cpu_devices=-1)"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "cpu_devices=-1" in bad.stderr


class _TwoViewNet(flax.linen.Module):
  """A model family the trainer has never heard of: reads a 8x8 and a 16x16 view."""
  num_classes: int

  @flax.linen.compact
  def __call__(self, views, *, train: bool = False):
    small, big = views
    feats = jax.numpy.concatenate([small.mean((1, 2)), big.mean((1, 2))], -1)
    first = flax.linen.Dense(self.num_classes, name="exit0")(small.reshape(len(small), -1))
    return (first, flax.linen.Dense(self.num_classes, name="exit1")(feats)), {}


def test_a_new_multi_input_family_trains_without_touching_train(tmp_path, monkeypatch):
  """Adding a family = adding a module with build/exit_macs/input_sizes (+ TAKES_VIEWS):
  the trainer derives the data views from it and feeds it, knowing no family by name."""
  import sys
  import types
  family = types.ModuleType("adaptive_vision.models.twoview")
  family.TAKES_VIEWS = True
  family.build = lambda cfg: _TwoViewNet(num_classes=cfg.num_classes)
  family.exit_macs = lambda cfg: [8 * 8 * 3 * cfg.num_classes, 9 * 8 * 8 * 3 * cfg.num_classes]
  family.input_sizes = lambda cfg: (8, 16)
  monkeypatch.setitem(sys.modules, "adaptive_vision.models.twoview", family)
  c = tiny_config(total_steps=4, checkpoint_every=2)
  c.model = ml_collections.ConfigDict(dict(name="twoview", num_classes=10))
  assert build.data_views(c) == (8, 16)
  summary = loop.train_and_evaluate(c, str(tmp_path / "w"))
  assert summary["step"] == 4
  with np.load(str(tmp_path / "w" / "test_logits.npz")) as f:
    assert f["exit_logits"].shape == (2, 64, 10)
  # A batch without the view a model reads is a one-line error naming both.
  with pytest.raises(ValueError, match=r"reads \(8, 16\) images but the batch carries \[16\]"):
    models.inputs_from_batch(c.model, {"image": np.zeros((1, 16, 16, 3))})


def test_student_and_teacher_of_different_resolutions_share_one_batch():
  """A plain ViT student (32x32) with a RAViT teacher (16, 32): the batch carries
  both views and each model takes its own."""
  c = ravit_cifar10.get_config("runlocal")
  teacher_model = c.model
  c.model = ml_collections.ConfigDict(dict(name="vit", num_classes=10, image_size=32,
                                           width=32, depth=1, num_heads=2, mlp_dim=64,
                                           patch_size=4))
  c.teacher = ml_collections.ConfigDict(dict(model=teacher_model, checkpoint=None))
  assert build.data_views(c) == (16, 32)
  batch = {"views": (np.zeros((2, 16, 16, 3)), np.ones((2, 32, 32, 3)))}
  assert models.inputs_from_batch(c.model, batch).shape == (2, 32, 32, 3)
  t = models.inputs_from_batch(c.teacher.model, batch)
  assert isinstance(t, tuple) and [v.shape[1] for v in t] == [16, 32]


def test_tensorboard_scalars_are_written_in_the_calling_thread(tmp_path):
  """Events land on disk at write() (no writer thread that a full disk could
  kill, leaving add_scalar blocked on its queue)."""
  import glob
  import struct
  import threading
  from tensorboardX.proto.event_pb2 import Event
  from adaptive_vision.train.metrics import MetricWriter
  threads = threading.active_count()
  writer = MetricWriter(str(tmp_path))
  assert threading.active_count() == threads
  writer.write(1, "train", {"loss": 2.5, "lr": 0.1})
  writer.write(2, "train", {"loss": 2.0, "lr": 0.1})
  (path,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  data, seen, i = open(path, "rb").read(), [], 0  # TFRecord: length, crc, event, crc
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    event = Event.FromString(data[i + 12:i + 12 + n])
    i += 16 + n
    seen += [(event.step, v.tag, round(v.simple_value, 4)) for v in event.summary.value]
  writer.close()
  assert seen == [(1, "train/loss", 2.5), (1, "train/lr", 0.1), (2, "train/loss", 2.0),
                  (2, "train/lr", 0.1)]
