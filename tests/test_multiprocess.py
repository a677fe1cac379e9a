"""Real multi-process training: two CPU processes on localhost (2 devices each),
joined by jax.distributed over a loopback port, started by launch/multihost.py
running the ordinary `python -m launch.train ... --distributed` command.

Each process reads its own slice of the training data (train[i::2]); both
write their parts of the checkpoint (array shards, their data-iterator
position), both restore it, and the result matches one process fed the same
global batches (the two slices concatenated) to float tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from adaptive_vision import data as data_lib, evaluation, losses, models
from adaptive_vision.train import checkpointing, loop, optim, sharding as shd, steps
from adaptive_vision.train.metrics import read_metrics

import test_reliability as rel  # the tiny config, on the command line and in process

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax
  except ImportError:  # layout changed: let the test run and show what happens
    return True
  return hasattr(_jax, "make_gloo_tcp_collectives")


def multihost(*args, timeout=420):
  env = rel.cli_env()
  return subprocess.run(
      [sys.executable, "-m", "launch.multihost", "--python", sys.executable, *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(workdir, *extra):
  return rel.train_cmd(workdir, f"--config.total_steps={STEPS}", *extra)[3:]


def single_process_reference(c):
  """Losses, params and test logits of one process fed the two slices' batches."""
  mesh = shd.make_mesh(dict(data=4, model=1))
  model = models.build(c.model)
  tx, schedule = optim.make_optimizer(c.optim, STEPS)
  init = loop.make_init_fn(model, tx, c)
  sharding = shd.state_shardings(jax.eval_shape(init, jax.random.PRNGKey(c.seed)), mesh)
  state = jax.jit(init, out_shardings=sharding)(jax.random.PRNGKey(c.seed))
  train_step = steps.jit_train_step(
      steps.make_train_step(model, tx, losses.loss_from_config(c.loss), schedule),
      mesh, sharding, None)
  slices = [data_lib.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=c.seed,
                                         process_index=i, process_count=2) for i in range(2)]
  step_losses = []
  for _ in range(STEPS):
    parts = [next(it) for it in slices]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = train_step(state, shd.global_batch(batch, mesh), None)
    step_losses.append(float(metrics["loss"]))
  eval_step = steps.jit_eval_step(steps.make_eval_step(model), mesh, sharding.params,
                                  sharding.batch_stats)
  logits, labels = evaluation.predict_exits(
      eval_step, state.params, state.batch_stats,
      data_lib.make_eval_iterator(c.data, "test", global_batch_size=c.eval_batch_size), mesh)
  return step_losses, jax.device_get(state.params), logits, labels


@pytest.mark.skipif(not _gloo_available(),
                    reason="this jaxlib has no gloo CPU collectives: multi-process CPU "
                           "training cannot run here")
def test_two_processes_checkpoint_restore_and_match_one_process(tmp_path):
  workdir = tmp_path / "mp"
  # Phase 1: both processes train to step 4 and write checkpoints 2 and 4 together.
  out = multihost("local", "--num_processes", "2", "--devices_per_process", "2",
                  "--timeout", "400", "--", *train_args(workdir, "--config.stop_at_step=4"))
  assert out.returncode == 0, out.stderr[-4000:]
  assert out.stderr.count("stopped at step 4") == 1  # printed by process 0 only
  step4 = workdir / "checkpoints" / "4"
  assert sorted(os.listdir(step4 / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step4 / "state"))
  # Phase 2: the same command; both processes restore step 4 and finish.
  out = multihost("local", "--num_processes", "2", "--devices_per_process", "2",
                  "--timeout", "400", "--", *train_args(workdir))
  assert out.returncode == 0, out.stderr[-4000:]
  assert "resuming from checkpoint at step 4" in out.stderr
  info = read_metrics(str(workdir), "info")[0]
  assert info["processes"] == 2 and info["devices"] == 4

  want_losses, want_params, want_logits, want_labels = single_process_reference(
      rel.tiny(total_steps=STEPS))
  got = rel.train_losses(str(workdir))
  assert sorted(got) == list(range(1, STEPS + 1))
  got_losses = np.array([got[s] for s in range(1, STEPS + 1)])
  params = jax.tree_util.tree_leaves(jax.device_get(
      checkpointing.restore_variables(str(workdir))["params"]))
  with np.load(workdir / "test_logits.npz") as f:
    labels, logits = f["labels"], f["exit_logits"]
  rel.record("multiprocess", steps=STEPS, processes=2, devices=4,
             max_loss_diff=float(np.max(np.abs(got_losses - want_losses))),
             max_param_diff=max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
                                zip(params, jax.tree_util.tree_leaves(want_params))),
             max_logit_diff=float(np.max(np.abs(logits - want_logits))))
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(params, jax.tree_util.tree_leaves(want_params)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(labels, want_labels)  # the split's order, as in one process
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)


def test_multihost_dry_run_prints_commands(tmp_path):
  args = ["--", "--config", "configs/vit_cifar10.py", "--workdir", "/shared/runs/vit"]
  out = multihost("tpu", "--name", "pod", "--zone", "us-central2-b", "--dry-run", *args)
  assert out.returncode == 0, out.stderr
  assert "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all" in out.stdout
  assert "-m launch.train --config configs/vit_cifar10.py --workdir /shared/runs/vit " \
         "--distributed" in out.stdout
  script = tmp_path / "job.sbatch"
  out = multihost("slurm", "--nodes", "2", "--gpus_per_node", "4", "--script", str(script),
                  "--dry-run", *args)
  assert out.returncode == 0, out.stderr
  text = script.read_text()
  assert text in out.stdout and f"sbatch {script}" in out.stdout
  for needle in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4",
                 "#SBATCH --signal=TERM@300", "#SBATCH --requeue", "srun ",
                 "--process_id=$SLURM_PROCID", "--num_processes=$SLURM_NTASKS",
                 "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID", '--coordinator_address="$COORDINATOR:$PORT"',
                 "--distributed"):
    assert needle in text, needle
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  out = multihost("local", "--num_processes", "2", "--port", "12345", "--dry-run", *args)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if "launch.train" in l]
  assert len(lines) == 2 and all("--coordinator_address=127.0.0.1:12345" in l for l in lines)
  assert "--process_id=0" in lines[0] and "--process_id=1" in lines[1]
