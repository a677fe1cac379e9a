"""Trained parameters in one file (launch.export, export.load_params), evaluation
from that file (launch.evaluate --params) and launch.predict on image files.

The subprocess tests train a tiny RAViT once (runlocal, 3 steps), export it,
and check that predict prints one line per image with the class, exit and
MACs of the full-cascade policy on the same preprocessed images, and that bad
input gets one error line and exit code 2. The in-process tests do the same
for the ERDE ResNet and the plain ViT from hand-made files.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from adaptive_vision import data as data_lib
from adaptive_vision import classify, early_exit, export, models
from adaptive_vision.data.sources import SyntheticSource
from adaptive_vision.inference import full_cascade_predict
from adaptive_vision.eval import predict as eval_predict
from adaptive_vision.train import checkpointing, loop
from configs import erde_cifar10, ravit_cifar10, vit_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"total_steps": 3, "data.synthetic_train_size": 128, "data.synthetic_test_size": 32,
        "data.val_size": 32, "batch_size": 16, "eval_batch_size": 32, "checkpoint_every": 3}
RAVIT = "configs/ravit_cifar10.py:runlocal"


def _tiny(config):
  for key, value in TINY.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _launch(name, *args):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run([sys.executable, "-m", f"launch.{name}", *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def _overrides():
  return [f"--config.{k}={v}" for k, v in TINY.items()]


def _write_images(folder, n=8, size=32, seed=1):
  """PNGs of the synthetic classes, some in a subfolder, plus a file that is not one."""
  source = SyntheticSource(n, size, 10, seed=seed)
  paths = []
  for i in range(n):
    path = folder / ("nested" if i >= n // 2 else "") / f"image{i}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(source[i]["image"]).save(path)
    paths.append(str(path))
  (folder / "README.txt").write_text("not an image; predict skips it in a folder")
  return sorted(paths)


def _reference(config, variables, paths, thresholds):
  """The static policy over every exit, on the images as the eval pipeline makes them."""
  examples = classify.load_images(config, paths)
  key = "views" if "views" in examples[0] else "image"
  batch = {key: tuple(np.stack(v) for v in zip(*[e[key] for e in examples])) if key == "views"
           else np.stack([e[key] for e in examples])}
  inputs = models.inputs_from_batch(config.model, batch)
  return full_cascade_predict(models.build(config.model), variables, inputs, thresholds)


def _mid_threshold(exit_logits, exit=0):
  """An entropy threshold halfway between two neighbouring images' entropies of
  `exit` near their median, so some images exit there and some go on."""
  ent = np.sort(np.asarray(early_exit.softmax_entropy(exit_logits[exit])))
  i = len(ent) // 2 - 1
  while i + 2 < len(ent) and ent[i + 1] - ent[i] < 1e-4:
    i += 1
  return float(0.5 * (ent[i] + ent[i + 1]))


def _parse(stdout):
  rows = []
  for line in stdout.strip().splitlines():
    path, name, exit_, macs = line.split("\t")
    rows.append({"path": path, "class_name": name, "exit": int(exit_.split()[1]),
                 "num_exits": int(exit_.split()[3]), "mmacs": float(macs.split()[0])})
  return rows


# ----------------------------------------------------------------------------
# RAViT end to end through the launchers


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  config = _tiny(ravit_cifar10.get_config("runlocal"))
  workdir = root / "run"
  loop.train_and_evaluate(config, str(workdir))
  params = root / "ravit.npz"
  proc = _launch("export", f"--config={RAVIT}", *_overrides(), "--workdir", workdir,
                 "--out", params, "--budgets", "0.55,1.0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  paths = _write_images(root / "images")
  return dict(root=root, config=config, workdir=workdir, params=params, paths=paths)


@pytest.mark.slow
def test_export_writes_one_checked_portable_file(exported):
  config, params = exported["config"], str(exported["params"])
  assert os.path.getsize(params) < 8 * 2 ** 20
  with np.load(params, allow_pickle=False) as f:  # numpy alone reads it
    keys = set(f.files)
    meta = json.loads(str(f["meta.json"]))
  assert "params/branch0/embedding/kernel" in keys and "params/branch1/head/kernel" in keys
  variables = export.load_params(params, config)
  restored = checkpointing.restore_variables(str(exported["workdir"]))
  for (pa, a), (pb, b) in zip(jax.tree_util.tree_flatten_with_path(variables)[0],
                              jax.tree_util.tree_flatten_with_path(restored)[0]):
    assert jax.tree_util.keystr(pa) == jax.tree_util.keystr(pb)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Thresholds calibrated on the validation split only, as early_exit.calibrate does.
  cal = meta["calibration"]
  assert cal["split"] == "val" and cal["num_examples"] == TINY["data.val_size"]
  val_logits, val_labels = eval_predict.evaluate(config, variables, splits=("val",))["val"]
  macs = models.exit_macs(config.model)
  for point in cal["budgets"]:
    want = early_exit.calibrate(val_logits, val_labels, macs, max_mean_macs=point["budget"] * macs[-1])
    np.testing.assert_allclose(point["thresholds"], want)
  assert meta["exit_macs"] == macs and meta["class_names"] == [f"class_{k}" for k in range(10)]
  assert meta["source"]["step"] == TINY["total_steps"]
  other = _tiny(vit_cifar10.get_config("runlocal"))
  with pytest.raises(ValueError, match="holds the parameters of another model .*model.name"):
    export.load_params(params, other)
  with pytest.raises(ValueError, match="not a parameters file"):
    export.load_params(exported["paths"][0], config)


@pytest.mark.slow
def test_export_recalibrates_a_params_file_without_its_workdir(exported, tmp_path):
  """--params: the same variables, thresholds for another rule and budget chosen
  on validation, the file's source (workdir, step, training config) kept."""
  config, params = exported["config"], str(exported["params"])
  out = tmp_path / "max_prob.npz"
  given = os.path.relpath(params, ROOT)  # a relative path, as a user would type it
  proc = _launch("export", f"--config={RAVIT}", *_overrides(), "--params", given,
                 "--out", out, "--budgets", "0.7", "--criterion", "max_prob")
  assert proc.returncode == 0, proc.stderr[-3000:]
  old_vars, old = export.load(params, config)
  new_vars, new = export.load(str(out), config)
  for a, b in zip(jax.tree_util.tree_leaves(old_vars), jax.tree_util.tree_leaves(new_vars)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cal = new["calibration"]
  assert cal["criterion"] == "max_prob" and [p["budget"] for p in cal["budgets"]] == [0.7]
  val_logits, val_labels = eval_predict.evaluate(config, new_vars, splits=("val",))["val"]
  macs = models.exit_macs(config.model)
  want = early_exit.calibrate(val_logits, val_labels, macs, criterion="max_prob",
                              max_mean_macs=0.7 * macs[-1])
  np.testing.assert_allclose(cal["budgets"][0]["thresholds"], want)
  for key in ("workdir", "step", "config"):
    assert new["source"][key] == old["source"][key]
  assert new["source"]["recalibrated_from"] == given  # not this machine's absolute path
  # One source, not both and not neither: one line, exit code 2.
  for flags in (["--params", params, "--workdir", exported["workdir"]], []):
    proc = _launch("export", f"--config={RAVIT}", *_overrides(), *flags, "--out", out)
    assert proc.returncode == 2 and "--workdir RUN" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_predict_prints_the_full_cascade_policy_per_image(exported):
  config, paths = exported["config"], exported["paths"]
  variables = export.load_params(str(exported["params"]), config)
  everyone = _reference(config, variables, paths, [0.0])  # all exit_logits
  threshold = _mid_threshold(everyone["exit_logits"])
  macs = models.exit_macs(config.model)
  # With --config, and without: the file describes itself.
  for flag, config_flag in ((["--threshold", threshold], [f"--config={RAVIT}"]),
                            (["--budget", "0.55"], [])):
    proc = _launch("predict", *config_flag, "--params", exported["params"],
                   exported["root"] / "images", *flag)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _parse(proc.stdout)
    assert [r["path"] for r in rows] == paths  # one line per image, README.txt skipped
    if flag[0] == "--threshold":
      thresholds = [threshold]
    else:
      thresholds = json.loads(str(np.load(exported["params"])["meta.json"]))[
          "calibration"]["budgets"][0]["thresholds"]
    ref = _reference(config, variables, paths, thresholds)
    assert [r["exit"] for r in rows] == ref["exit_index"].tolist()
    assert [r["class_name"] for r in rows] == [f"class_{c}" for c in ref["predictions"]]
    assert all(r["num_exits"] == 2 for r in rows)
    np.testing.assert_allclose([r["mmacs"] for r in rows],
                               [round(macs[e] / 1e6, 2) for e in ref["exit_index"]])
    if flag[0] == "--threshold":
      assert set(ref["exit_index"].tolist()) == {0, 1}  # both exits were taken


@pytest.mark.slow
def test_predict_runs_each_call_on_the_calling_thread(monkeypatch):
  """launch.predict answers one image per call: it sets up the process for
  the 'serve' workload, which on CPU means synchronous dispatch, applied
  before the first computation (a fresh process; a trainer keeps the default)."""
  from launch import common, predict
  seen = []

  class Stop(Exception):
    pass

  def fake_setup(**kwargs):
    seen.append(kwargs)
    raise Stop
  monkeypatch.setattr(common, "setup", fake_setup)
  with pytest.raises(Stop):
    predict.main(["predict", "image.png"])
  assert seen == [{"workload": "serve"}]
  # What synchronous dispatch means: a call returns only once its result is
  # computed. A program of ~0.1 s (three 800x800 matrix products) is still
  # running when an asynchronous call returns.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  code = ("import sys; from launch import common; common.setup(workload=sys.argv[1]); "
          "import jax, jax.numpy as jnp; x = jnp.ones((800, 800)); "
          "f = jax.jit(lambda x: jnp.tanh(x @ x @ x @ x)); "
          "f(x).block_until_ready(); "
          "print(sum(f(x).is_ready() for _ in range(5)))")
  for workload, ready in (("serve", {"5"}), ("train", {"0", "1", "2", "3", "4"})):
    proc = subprocess.run([sys.executable, "-c", code, workload], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] in ready, (workload, proc.stdout)


@pytest.mark.slow
def test_predict_bad_input_is_one_line_and_exit_code_2(exported, tmp_path):
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "notes.txt").write_text("no images here")
  fake = tmp_path / "photo.png"
  fake.write_text("this is text, not a PNG")
  cases = {
      "not an image": ([f"--config={RAVIT}", "--params", exported["params"], fake],
                       "photo.png is not an image"),
      "no images": ([f"--config={RAVIT}", "--params", exported["params"], tmp_path / "empty"],
                    "holds no images"),
      "another model": (["--config=configs/vit_cifar10.py:runlocal", "--params",
                         exported["params"], exported["root"] / "images"],
                        "holds the parameters of another model"),
      "unknown budget": ([f"--config={RAVIT}", "--params", exported["params"],
                          exported["root"] / "images", "--budget", "0.3"],
                         "no thresholds for --budget 0.3"),
  }
  for name, (args, message) in cases.items():
    proc = _launch("predict", *args)
    assert proc.returncode == 2, (name, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
    assert proc.stdout == "", name


@pytest.mark.slow
def test_evaluate_from_the_params_file(exported, tmp_path):
  out = tmp_path / "from_params"
  # No --config: the file holds the config it was trained with.
  proc = _launch("evaluate", "--params", exported["params"], "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out / "test_logits.npz") as a, np.load(exported["workdir"] / "test_logits.npz") as b:
    np.testing.assert_allclose(a["exit_logits"], b["exit_logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a["labels"], b["labels"])
  assert (out / "report.json").exists()


# ----------------------------------------------------------------------------
# ERDE ResNet and the plain ViT, in process


def _hand_made_file(path, config, variables, val_inputs, val_labels, budgets=(0.6,)):
  """What launch.export writes, from variables that were never trained."""
  model = models.build(config.model)
  logits = np.stack([np.asarray(x) for x in jax.jit(
      lambda v, x: model.apply(v, x)[0])(variables, val_inputs)])
  macs = models.exit_macs(config.model)
  meta = {"model": export.model_fields(config.model), "exit_macs": macs,
          "preprocessing": export.preprocessing(config), "class_names": None,
          "calibration": export.calibration(logits, val_labels, macs, budgets,
                                            reference_macs=macs[-1], reference="the last exit")}
  export.save(str(path), variables, meta)
  return logits


@pytest.mark.slow
def test_resnet_and_vit_files_predict_like_the_full_cascade(tmp_path):
  from test_resnet import _abstract_variables, materialize
  paths = _write_images(tmp_path / "images", n=10)
  erde = erde_cifar10.get_config("runlocal")  # a ResNet-8 student with two early exits
  resnet = models.build(erde.model)
  vit = vit_cifar10.get_config("runlocal")
  vit_model = models.build(vit.model)
  rng = np.random.default_rng(0)
  val = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 16)
  cases = [("resnet", erde, materialize(_abstract_variables(resnet), seed=4)),
           ("vit", vit, jax.jit(vit_model.init)(jax.random.key(0), val[:2]))]
  for name, config, variables in cases:
    path = tmp_path / f"{name}.npz"
    _hand_made_file(path, config, variables, val, labels)
    loaded, meta = export.load(str(path), config)
    num_exits = models.num_exits(config.model)
    everyone = _reference(config, loaded, paths, [0.0] * (num_exits - 1))
    thresholds = ([_mid_threshold(everyone["exit_logits"], e) for e in range(num_exits - 1)])
    ref = _reference(config, loaded, paths, thresholds)
    rows = list(classify.predict_files(config, loaded, paths, thresholds))
    assert [r["exit"] for r in rows] == ref["exit_index"].tolist(), name
    assert [r["class_index"] for r in rows] == ref["predictions"].tolist(), name
    macs = models.exit_macs(config.model)
    assert [r["macs"] for r in rows] == [macs[e] for e in ref["exit_index"]]
    if num_exits > 1:
      assert len(set(ref["exit_index"].tolist())) > 1, name  # the exits really differ
      t, _, what = export.thresholds_for(meta, num_exits, budget=0.6)
      assert len(t) == num_exits - 1 and "validation" in what
    else:
      assert export.thresholds_for(meta, 1)[0] == []
      with pytest.raises(ValueError, match="no thresholds keep validation mean MACs"):
        export.thresholds_for(meta, 1, budget=0.6)
    line = classify.format_row(rows[0])
    assert line.split("\t")[2] == f"exit {rows[0]['exit']} of {num_exits}"
  # A ResNet file against the ViT config, and a changed field of the same family.
  with pytest.raises(ValueError, match="another model .*model.name is 'resnet'"):
    export.load_params(str(tmp_path / "resnet.npz"), vit)
  deeper = erde_cifar10.get_config("runlocal,student_depth=14")
  with pytest.raises(ValueError, match="another model .*model.depth is 8 in the file but 14"):
    export.load_params(str(tmp_path / "resnet.npz"), deeper)
  other_norm = erde_cifar10.get_config("runlocal")
  other_norm.data.normalize = "none"
  with pytest.raises(ValueError, match="another eval preprocessing"):
    export.load_params(str(tmp_path / "resnet.npz"), other_norm)


def test_image_files_and_load_image(tmp_path):
  paths = _write_images(tmp_path / "images", n=4)
  assert data_lib.image_files([str(tmp_path / "images")]) == paths
  assert data_lib.image_files([paths[1], paths[0]]) == [paths[1], paths[0]]
  with pytest.raises(ValueError, match="holds no images"):
    (tmp_path / "empty").mkdir()
    data_lib.image_files([str(tmp_path / "empty")])
  with pytest.raises(ValueError, match="does not exist"):
    data_lib.image_files([str(tmp_path / "missing.png")])
  config = ravit_cifar10.get_config("runlocal")
  views = data_lib.load_image(config.data, paths[0], (16, 32))["views"]
  assert [v.shape for v in views] == [(16, 16, 3), (32, 32, 3)]
  # The eval pipeline's own preprocessing of the same pixels.
  pre = data_lib.preprocess(config.data, train=False, views=(16, 32))
  want = pre({"image": np.asarray(Image.open(paths[0]).convert("RGB")), "label": 0})["views"]
  for a, b in zip(views, want):
    np.testing.assert_array_equal(a, b)
  (tmp_path / "bad.jpg").write_bytes(b"\x00" * 10)
  with pytest.raises(ValueError, match="bad.jpg is not an image"):
    data_lib.load_image(config.data, str(tmp_path / "bad.jpg"))
