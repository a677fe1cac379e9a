"""The benchmark runner: every section end to end in --quick form, the PyTorch
peers against our models with our weights copied in, the targets judged.
No test asserts a speed: only that each figure was measured and written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import common, loop, report
from benchmarks import train as train_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_section(section, out):
  """`python -m benchmarks.run <section> --quick` without the test session's
  XLA_FLAGS (conftest's 8 fake devices): the section sets its own process up."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", section, "--quick",
                         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  results = json.loads(out.read_text())
  s = results["sections"][section]
  assert s["quick"] and s["command"].startswith("python -m benchmarks.run " + section)
  assert s["machine"]["description"] and s["machine"]["jax"]
  for name, c in s["comparisons"].items():
    assert c["median"] > 0 and c["quartiles"][0] <= c["median"] <= c["quartiles"][1], name
  for t in results["targets"]:
    if t["section"] == section:
      assert t["value"] == s["figures"][t["name"]] and t["met"] is None, t  # quick: not judged
  assert f"## {section} (--quick)" in out.with_suffix(".md").read_text()
  return s


@pytest.mark.slow
@pytest.mark.requires("torch")
def test_train_section(tmp_path):
  s = _run_section("train", tmp_path / "bench.json")
  v = s["variants"]
  assert v["teacher"]["params"] == v["teacher_torch"]["params"] == v["teacher_plain"]["params"]
  assert v["vit"]["params"] == v["vit_torch"]["params"]
  assert (v["vit"]["devices"], v["vit_devices4"]["devices"]) == (1, 4)
  # The plain process (backend.setup only) chose the launcher's implementations.
  assert v["teacher_plain"]["backend"] == v["teacher"]["backend"]
  assert set(s["figures"]) == {f for f, _, _ in train_section.PAIRS}


@pytest.mark.slow
@pytest.mark.requires("cifar10")
def test_loop_section(tmp_path):
  s = _run_section("loop", tmp_path / "bench.json")
  assert set(s["variants"]) == {"loop", "bare"}
  assert s["figures"]["train_loop_over_bare_step"] > 0


@pytest.mark.slow
@pytest.mark.requires("cifar10")
def test_latency_section(tmp_path):
  s = _run_section("latency", tmp_path / "bench.json")
  v, f = s["variants"], s["figures"]
  for cascade, base in (("ravit", "vit_final"), ("student", "student_final")):
    for opt in ("lib", "xla"):
      assert v[f"{cascade}_{opt}"]["mean_macs"] < v[f"{base}_{opt}"]["mean_macs"]
    assert f[f"{cascade}_best_baseline"] in (f"{base}_lib", f"{base}_xla")
    assert f"{cascade}_xla_vs_lib" in s["comparisons"]
  assert f["early_exit_batch1_realized_over_predicted"] == min(
      f["ravit_batch1_realized_over_predicted"], f["student_batch1_realized_over_predicted"])
  for cascade, exits in (("ravit", 2), ("student", 3)):  # the profile: one exit at a time
    for k in range(exits):
      onehot = [1.0 if j == k else 0.0 for j in range(exits)]
      assert v[f"{cascade}_at_exit{k}_lib"]["exit_fractions"] == onehot
      assert f[f"{cascade}_exit{k}_time_share"] > 0
    best = v[f[f"{cascade}_best_baseline"]]
    assert f[f"{cascade}_exit{exits - 1}_mac_share"] == pytest.approx(
        v[f"{cascade}_at_exit{exits - 1}_lib"]["mean_macs"] / best["mean_macs"])
    assert f[f"{cascade}_time_predicted_over_measured"] > 0


@pytest.mark.slow
@pytest.mark.requires("cifar10")
def test_batched_section(tmp_path):
  s = _run_section("batched", tmp_path / "bench.json")
  dynamic = {k: v for k, v in s["variants"].items() if "_dynamic" in k}
  assert len(dynamic) == 4  # two families, two budgets, one --quick batch size
  for v in dynamic.values():
    assert v["counts"][0] == 32 and all(p >= c for p, c in zip(v["padded_counts"], v["counts"]))
    assert v["padded_mean_macs"] >= v["mean_macs"]
  f = s["figures"]
  ratios = [c for k, c in s["comparisons"].items() if "_dynamic" in k]
  assert f["batched_realized_over_predicted"] == min(
      c["realized_over_predicted"] for c in ratios if not c["what"].endswith("no_exit"))
  assert f["batched_dynamic_over_no_exit"] == min(
      c["median"] for c in ratios if c["what"].endswith("no_exit"))


def test_targets_are_judged_from_the_sections(tmp_path):
  section = {"quick": False, "figures": {"resnet_train_speedup_vs_torch_eager": 1.02,
                                         "plain_process_over_launcher": 0.9,
                                         "vit_train_speedup_vs_torch_eager": 0.8}}
  path = tmp_path / "bench.json"
  report.write(str(path), "train", section)
  report.write(str(path), "loop", {"quick": True, "figures": {"train_loop_over_bare_step": 0.5}})
  results = json.loads(path.read_text())
  assert set(results["sections"]) == {"train", "loop"}  # each write keeps the others
  t = {x["name"]: x for x in results["targets"]}
  assert t["resnet_train_speedup_vs_torch_eager"]["met"] is True
  assert t["plain_process_over_launcher"]["met"] is False
  assert "MISSED" in t["plain_process_over_launcher"]["summary"]
  assert t["vit_train_speedup_vs_torch_eager"]["met"] is None  # reported, no goal
  assert t["train_loop_over_bare_step"]["met"] is None  # a --quick section
  assert t["batched_realized_over_predicted"]["value"] is None
  assert "benchmarks.run batched" in t["batched_realized_over_predicted"]["summary"]
  assert "| resnet_train_speedup_vs_torch_eager | train | 1.020 vs 1: MET |" in \
      path.with_suffix(".md").read_text()


def test_speedup_is_the_median_of_per_round_ratios():
  times = {"base": [2.0, 2.0, 4.0, 1.0], "fast": [1.0, 1.0, 1.0, 1.0]}
  s = common.speedup(times, "base", "fast")
  assert s["median"] == 2.0 and s["quartiles"] == [1.75, 2.5] and s["rounds"] == 4


def test_loop_window_is_timed_from_the_loops_own_log_lines():
  """Records whose cumulative rates come from known times: 2 s for the first
  25 steps after the clock's origin (step 101), then 0.1 s per step."""
  batch, start = 128, 100
  seconds = {125: 2.0, 150: 4.5, 175: 7.0, 200: 9.5}
  records = [{"step": s, "images_per_sec": (s - start - 1) * batch / t}
             for s, t in seconds.items()]
  steps, elapsed = loop.window_rate(records, batch, start)
  assert steps == 75 and elapsed == pytest.approx(7.5)
  with pytest.raises(ValueError, match="two train log lines"):
    loop.window_rate(records[:1], batch, start)


def _t(x):
  import torch
  return torch.from_numpy(np.array(x, dtype=np.float32))


@pytest.mark.requires("torch")
def test_torch_vit_computes_our_logits():
  import jax
  import torch
  from adaptive_vision import models
  from benchmarks import torch_vit
  from configs import vit_cifar10
  config = vit_cifar10.get_config()
  config.model.update(depth=2, head_zero_init=False)
  model = models.build(config.model)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  p = model.init(jax.random.key(0), x)["params"]
  (ours,), _ = model.apply({"params": p}, x)
  peer = torch_vit.build(torch_vit.spec_from_config(config, batch=4))

  def dense(linear, q, in_axes=1):  # flax [*in, *out] -> torch [out, in]
    k = np.asarray(q["kernel"])
    linear.weight.data = _t(k.reshape(int(np.prod(k.shape[:in_axes])), -1).T)
    linear.bias.data = _t(np.asarray(q["bias"]).reshape(-1))

  def norm(ln, q):
    ln.weight.data, ln.bias.data = _t(q["scale"]), _t(q["bias"])

  peer.embedding.weight.data = _t(np.transpose(p["embedding"]["kernel"], (3, 2, 0, 1)))
  peer.embedding.bias.data = _t(p["embedding"]["bias"])
  peer.pos_embedding.data, peer.cls.data = _t(p["pos_embedding"]), _t(p["cls"])
  for i, block in enumerate(peer.blocks):
    q = p[f"block{i}"]
    norm(block.norm1, q["norm1"])
    norm(block.norm2, q["norm2"])
    dense(block.attn.qkv, q["attn"]["qkv"])
    dense(block.attn.out, q["attn"]["out"], in_axes=2)
    dense(block.mlp[0], q["mlp"]["Dense_0"])
    dense(block.mlp[2], q["mlp"]["Dense_1"])
  norm(peer.encoder_norm, p["encoder_norm"])
  dense(peer.head, p["head"])
  with torch.no_grad():
    theirs = peer(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  assert np.abs(ours).max() > 1e-2  # a non-trivial head
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.requires("torch")
@pytest.mark.parametrize("arg", ["role=teacher", "loss=erde"])
def test_torch_resnet_computes_our_logits(arg):
  """Every exit of the ERDE teacher / student, BatchNorm statistics included."""
  import jax
  import torch
  from adaptive_vision import models
  from benchmarks import torch_resnet
  from configs import erde_cifar10
  config = erde_cifar10.get_config(arg)
  model = models.build(config.model)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  v = model.init(jax.random.key(0), x)
  v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
      lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), v["batch_stats"])}
  ours = model.apply(v, x)[0]
  peer = torch_resnet.build(torch_resnet.spec_from_config(config, batch=4)["model"]).eval()
  p, s = v["params"], v["batch_stats"]

  def conv(c, q):
    c.weight.data = _t(np.transpose(q["kernel"], (3, 2, 0, 1)))

  def bn(b, name, params, stats):
    b.weight.data, b.bias.data = _t(params[name]["scale"]), _t(params[name]["bias"])
    b.running_mean.data, b.running_var.data = _t(stats[name]["mean"]), _t(stats[name]["var"])

  def fc(linear, q):
    linear.weight.data, linear.bias.data = _t(np.asarray(q["kernel"]).T), _t(q["bias"])

  conv(peer.stem[0], p["stem_conv"])
  bn(peer.stem[1], "stem_norm", p, s)
  for i, block in enumerate(peer.blocks):
    q, t = p[f"block{i}"], s[f"block{i}"]
    conv(block.conv1, q["conv1"])
    bn(block.bn1, "norm1", q, t)
    conv(block.conv2, q["conv2"])
    bn(block.bn2, "norm2", q, t)
    if block.proj is not None:
      conv(block.proj[0], q["proj_conv"])
      bn(block.proj[1], "proj_norm", q, t)
  for i, head in peer.heads.items():
    bn(head.bn, "norm", p[f"exit_block{i}"], s[f"exit_block{i}"])
    fc(head.fc, p[f"exit_block{i}"]["dense"])
  fc(peer.fc, p["head"])
  with torch.no_grad():
    theirs = peer(torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous(
        memory_format=torch.channels_last))
  assert len(theirs) == len(ours) == 3
  for a, b in zip(theirs, ours):
    np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-4, atol=1e-4)
