"""Distillation: the teacher is frozen, never checkpointed with the student, and a
runlocal ERDE run trains end to end from a teacher checkpoint the test makes."""

import os

import jax
import numpy as np
import pytest

from adaptive_vision import models
from adaptive_vision import sharding as shd
from adaptive_vision.train import build, checkpointing, loop
from configs import erde_cifar10

# Each test trains a teacher or a student: whole runs.
pytestmark = pytest.mark.slow


def small(c, teacher_role=False):
  c.data.synthetic_train_size = 128
  c.data.synthetic_test_size = 32
  c.data.val_size = 32
  c.data.image_size = 16
  c.batch_size = 16
  c.eval_batch_size = 32
  c.total_steps = 4
  c.checkpoint_every = 2
  c.log_every = 1
  # Teacher twice as wide as the student, so their parameter shapes differ.
  c.model.update(image_size=16, width_multiplier=0.5 if teacher_role else 0.25)
  if c.get("teacher"):
    c.teacher.model.update(image_size=16, width_multiplier=0.5)
  return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher") / "run")
  loop.train_and_evaluate(small(erde_cifar10.get_config("role=teacher,runlocal,teacher_depth=8"),
                           teacher_role=True), workdir)
  return workdir


def _student(loss, teacher_dir):
  return small(erde_cifar10.get_config(
      f"loss={loss},runlocal,teacher_dir={teacher_dir},teacher_depth=8"))


def test_erde_student_trains_from_teacher_checkpoint(teacher_dir, tmp_path):
  c = _student("erde", teacher_dir)
  workdir = str(tmp_path / "student")
  summary = loop.train_and_evaluate(c, workdir)
  assert summary["step"] == 4
  with np.load(os.path.join(workdir, "test_logits.npz")) as f:
    assert f["exit_logits"].shape[0] == 3
  # The student's checkpoint holds the student only.
  saved = checkpointing.restore_variables(workdir)
  assert checkpointing.shapes_of(saved["params"]) == checkpointing.shapes_of(
      jax.eval_shape(lambda: models.build(c.model).init(
          jax.random.PRNGKey(0), models.dummy_inputs(c.model)))["params"])
  teacher = checkpointing.restore_variables(teacher_dir)
  assert checkpointing.shapes_of(saved["params"]) != checkpointing.shapes_of(teacher["params"])


def test_teacher_gets_no_gradient_and_stays_frozen(teacher_dir):
  c = _student("kd", teacher_dir)
  c.teacher_cache = ""  # the teacher inside the step, as this test inspects it
  trainer = build.build(c, shd.make_mesh(dict(data=1, model=1)), total_steps=10)
  step, teacher_vars = trainer.train_step_fn, trainer.teacher_variables
  state = trainer.init_fn(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  # d(student loss)/d(teacher variables) is exactly zero: stop_gradient on the teacher.
  grads = jax.grad(lambda tv: step(state, batch, tv)[1]["loss"])(teacher_vars)
  assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))
  new_state, _ = jax.jit(step)(state, batch, teacher_vars)
  assert int(new_state.step) == 1  # the student moved; the teacher is an argument, not state


def test_missing_or_mismatched_teacher_is_a_clear_error(teacher_dir, tmp_path):
  c = _student("erde", str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=r"^no checkpoint directory at .*nowhere; train "
                     r"the teacher first .* point teacher\.checkpoint at DIR$"):
    loop.train_and_evaluate(c, str(tmp_path / "s1"))
  c = _student("erde", teacher_dir)
  c.teacher.model.depth = 14
  c.teacher.model.exits = (1, 3)  # the checkpoint holds a ResNet-8
  with pytest.raises(ValueError, match="does not match teacher.model"):
    loop.train_and_evaluate(c, str(tmp_path / "s2"))
  assert not os.path.exists(str(tmp_path / "s2" / "checkpoints" / "4"))


def _losses(workdir):
  from adaptive_vision.train.metrics import read_metrics
  return [r["loss"] for r in read_metrics(workdir, "train")]


def test_teacher_logits_cache_is_shared_by_students_of_one_seed(teacher_dir, tmp_path):
  """A kd student with the cache trains like one without (float32 noise of a
  separately compiled teacher forward); an erde student of the same seed reads
  the stored logits instead of running the teacher (no file rewritten); another
  seed gets its own folder."""
  plain = _student("kd", teacher_dir)
  plain.teacher_cache = ""
  loop.train_and_evaluate(plain, str(tmp_path / "plain"))
  cached = _student("kd", teacher_dir)
  cached.teacher_cache = str(tmp_path / "cache")
  loop.train_and_evaluate(cached, str(tmp_path / "cached"))
  np.testing.assert_allclose(_losses(str(tmp_path / "cached")), _losses(str(tmp_path / "plain")),
                             rtol=2e-5)
  (folder,) = [p for p in (tmp_path / "cache").iterdir()]
  files = sorted(p.name for p in folder.iterdir())
  assert files == sorted(["key.json"] + [f"{s:08d}.npy" for s in range(4)])
  stored = np.load(folder / "00000000.npy")
  assert stored.shape == (16, 3, 10) and stored.dtype == np.float32  # batch, exits, classes
  mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  other = _student("erde", teacher_dir)
  other.teacher_cache = str(tmp_path / "cache")
  loop.train_and_evaluate(other, str(tmp_path / "erde"))
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
  seed1 = _student("kd", teacher_dir)
  seed1.teacher_cache, seed1.seed = str(tmp_path / "cache"), 1
  loop.train_and_evaluate(seed1, str(tmp_path / "seed1"))
  assert len(list((tmp_path / "cache").iterdir())) == 2


def test_teacher_from_a_params_file_trains_the_student_like_its_run(teacher_dir, tmp_path,
                                                                   monkeypatch):
  """A trained teacher travels as one launch.export file: a student distilled
  from it trains exactly like one distilled from the teacher's run; a file of
  another model is one clear error; the 'auto' logits cache of a file teacher
  lives in the cache root, not beside the file."""
  from adaptive_vision.train import teacher_cache
  from launch import export
  teacher_cfg = small(erde_cifar10.get_config("role=teacher,runlocal,teacher_depth=8"),
                      teacher_role=True)
  params = str(tmp_path / "params" / "teacher.npz")
  export.export(teacher_cfg, teacher_dir, params, ["0.5"])
  from_run, from_file = _student("kd", teacher_dir), _student("kd", params)
  from_run.teacher_cache = from_file.teacher_cache = ""
  _, run_vars = build.load_teacher(from_run.teacher)
  _, file_vars = build.load_teacher(from_file.teacher)
  for a, b in zip(jax.tree_util.tree_leaves(run_vars), jax.tree_util.tree_leaves(file_vars)):
    np.testing.assert_array_equal(np.asarray(a), b)
  loop.train_and_evaluate(from_run, str(tmp_path / "run"))
  loop.train_and_evaluate(from_file, str(tmp_path / "file"))
  assert _losses(str(tmp_path / "file")) == _losses(str(tmp_path / "run"))
  other = _student("kd", params)
  other.teacher.model.depth, other.teacher.model.exits = 14, (1, 3)
  with pytest.raises(ValueError, match=r"^teacher params file .*teacher\.npz holds the parameters"
                                       r" of another model \(model\.depth is 8 in the file but 14"):
    build.load_teacher(other.teacher)
  monkeypatch.setenv("ADAPTIVE_VISION_CACHE", str(tmp_path / "cache"))
  auto = _student("kd", params)
  auto.teacher_cache = "auto"
  assert teacher_cache.cache_root(auto) == str(tmp_path / "cache" / "teacher_logits" / "teacher")
  assert teacher_cache.cache_root(_student("kd", teacher_dir)) == os.path.join(teacher_dir,
                                                                               "logits_cache")
