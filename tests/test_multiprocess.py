"""Real multi-process training: two CPU processes on localhost (2 devices each),
joined by jax.distributed over a loopback port, started by launch/multihost.py
running the ordinary `python -m launch.train ... --distributed` command.

Each process reads its own rows of every global batch. A SIGTERM to one
process makes both save the same step (jax's preemption service) and exit;
both wrote their parts of that checkpoint (array shards, their data-iterator
position); the same command restores it on both, and the result matches one
process fed the same global batches (the two parts concatenated) to float
tolerance: per-step losses, parameters, test logits.

One lock for the whole job: process 0 holds the workdir's lock, the other
process takes none; a second two-process job on a workdir in use stops in
both processes (neither waits in a collective), process 0 naming the holder,
and writes nothing.

Topology changes: a two-process run stopped at step 6 and resumed as one
process, and a one-process run resumed as two, with replicated and with FSDP
parameters, end with the per-step losses, parameters and test logits of a
one-process run that never stopped (float tolerance: sums over 2 or 4 devices).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from adaptive_vision import data as data_lib
from adaptive_vision import workdir_lock
from adaptive_vision.eval import predict
from adaptive_vision import sharding as shd
from adaptive_vision.train import build, checkpointing
from adaptive_vision.train.metrics import read_metrics
from launch import multihost

import test_reliability as rel  # the tiny config, on the command line and in process
from test_workdir_lock import snapshot, start_holder

# Subprocesses and whole runs: `pytest -m 'not slow'` skips them (CI runs all).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
REPEATS = rel.REPEATS


def run_multihost(*args, timeout=420):
  env = rel.cli_env()
  return subprocess.run(
      [sys.executable, "-m", "launch.multihost", "--python", sys.executable, *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(workdir, *extra):
  return rel.train_cmd(workdir, f"--config.total_steps={STEPS}", *extra)[3:]


def single_process_reference(c):
  """Losses, params and test logits of one process fed the two slices' batches."""
  mesh = shd.make_mesh(dict(data=4, model=1))
  trainer = build.build(c, mesh, total_steps=STEPS)
  state, train_step = trainer.init_state(), trainer.train_step
  slices = [data_lib.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=c.seed,
                                         process_index=i, process_count=2) for i in range(2)]
  step_losses = []
  for _ in range(STEPS):
    parts = [next(it) for it in slices]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = train_step(state, shd.global_batch(batch, mesh), None)
    step_losses.append(float(metrics["loss"]))
  logits, labels = predict.predict_exits(
      trainer.eval_step, state.params, state.batch_stats,
      data_lib.make_eval_iterator(c.data, "test", global_batch_size=c.eval_batch_size), mesh)
  return step_losses, jax.device_get(state.params), logits, labels


def start_processes(workdir, log_prefix):
  """The two processes of `launch.train ... --distributed` on localhost, each
  logging to <log_prefix><i>.log."""
  args = argparse.Namespace(num_processes=2, devices_per_process=2, python=sys.executable)
  procs, logs = [], []
  for i, (extra, cmd) in enumerate(multihost.local_commands(args, train_args(workdir),
                                                            multihost.free_port())):
    logs.append(Path(f"{log_prefix}{i}.log"))
    with open(logs[-1], "wb") as log:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env={**rel.cli_env(), **extra},
                                    stdout=log, stderr=subprocess.STDOUT))
  return procs, logs


@pytest.mark.requires("gloo")
def test_two_processes_preempt_restore_and_match_one_process(tmp_path):
  workdir = tmp_path / "mp"
  # Phase 1: the two processes train; SIGTERM reaches process 1 only (as when a
  # scheduler preempts one host). Both save the same step and exit.
  procs, logs = start_processes(workdir, tmp_path / "process")
  try:
    rel.wait_until(lambda: len(rel.logged_steps(str(workdir))) >= 2, procs[0], timeout=400)
    # One lock for the job, process 0's; process 1 took none.
    holder = workdir_lock.read(str(workdir))
    assert holder["pid"] == procs[0].pid and holder["host"] == socket.gethostname()
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [l.read_text() for l in logs]
  assert codes == [75, 75], texts
  assert workdir_lock.read(str(workdir)) is None  # released by process 0 on its way out
  assert not any("took over" in t for t in texts), texts
  saved = [int(t.split("saved a checkpoint at step ")[1].split()[0]) for t in texts]
  assert saved[0] == saved[1] and saved[0] < STEPS, saved  # the same step on both
  step_dir = workdir / "checkpoints" / str(saved[0])
  assert sorted(os.listdir(step_dir / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step_dir / "state"))
  # A second two-process job while another process holds the workdir: both of
  # its processes stop (exit 2), process 0 naming the holder; nothing written.
  holder = start_holder(str(workdir), env=rel.cli_env())
  try:
    before = snapshot(str(workdir))
    t0 = time.time()
    refused, refused_logs = start_processes(workdir, tmp_path / "refused")
    try:
      refused_codes = [p.wait(timeout=300) for p in refused]
      refused_after = time.time() - t0
    finally:
      for p in refused:
        if p.poll() is None:
          p.kill()
    assert snapshot(str(workdir)) == before
  finally:
    holder.terminate()
    holder.wait(timeout=30)
  refused_texts = [l.read_text() for l in refused_logs]
  errors = [[l for l in t.splitlines() if l.startswith("error:")] for t in refused_texts]
  assert refused_codes == [2, 2], refused_texts
  assert len(errors[0]) == 1 and errors[0][0].startswith(
      f"error: workdir {workdir} is in use by pid {holder.pid} on host "), refused_texts[0]
  assert errors[1] == [f"error: process 0 could not take the lock of workdir {workdir} (its "
                       "error names the holder); nothing was written"], refused_texts[1]
  # Phase 2: the same command (through launch/multihost.py); both processes
  # restore that step and finish.
  out = run_multihost("local", "--num_processes", "2", "--devices_per_process", "2",
                  "--timeout", "400", "--", *train_args(workdir))
  assert out.returncode == 0, out.stderr[-4000:]
  assert f"resuming from checkpoint at step {saved[0]}" in out.stderr
  assert "took over" not in out.stderr and workdir_lock.read(str(workdir)) is None
  assert out.stderr.count("done: step") == 1  # printed by process 0 only
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
  rel.record("multiprocess", steps=STEPS, processes=2, devices=4, preempted_at=saved[0],
             lock_holder_pid_is_process_0=True, second_job_codes=refused_codes,
             second_job_refused_after_s=round(refused_after, 1),
             max_loss_diff=float(np.max(np.abs(got_losses - want_losses))),
             max_param_diff=max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
                                zip(params, jax.tree_util.tree_leaves(want_params))),
             max_logit_diff=float(np.max(np.abs(logits - want_logits))))
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, atol=1e-6)
  # Sums over 4 devices in another order: ~1e-7 differences in gradients, which
  # Adam turns into up to ~1e-6..1e-5 differences in near-zero parameters.
  for a, b in zip(params, jax.tree_util.tree_leaves(want_params)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=5e-5)
  np.testing.assert_array_equal(labels, want_labels)  # the split's order, as in one process
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- topology

STOP = 6
SHARDING = {  # FSDP splits parameters of >= 2**14 values: a wider model has some
    "replicate": [],
    "fsdp": ["--config.param_sharding=fsdp", "--config.model.width=128",
             "--config.model.mlp_dim=256"],
}


def run_on(topology, workdir, *extra):
  """launch.train on `topology`: '2x2' (two processes of 2 CPU devices) or '1x2'."""
  if topology == "2x2":
    out = run_multihost("local", "--num_processes", "2", "--devices_per_process", "2",
                        "--timeout", "400", "--", *train_args(workdir, *extra))
  else:
    out = subprocess.run([sys.executable, "-m", "launch.train", *train_args(workdir, *extra),
                          "--cpu_devices=2"], cwd=REPO, env=rel.cli_env(),
                         capture_output=True, text=True, timeout=420)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One process, 2 devices, never stopped: per sharding, its workdir."""
  runs = {}

  def get(sharding):
    if sharding not in runs:
      workdir = tmp_path_factory.mktemp(f"uninterrupted_{sharding}") / "run"
      run_on("1x2", workdir, *SHARDING[sharding])
      runs[sharding] = str(workdir)
    return runs[sharding]
  return get


def _outputs(workdir):
  losses = rel.train_losses(workdir)
  params = jax.tree_util.tree_leaves(jax.device_get(
      checkpointing.restore_variables(workdir)["params"]))
  with np.load(os.path.join(workdir, "test_logits.npz")) as f:
    return losses, params, f["exit_logits"], f["labels"]


@pytest.mark.requires("gloo")
@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("sharding", list(SHARDING))
@pytest.mark.parametrize("before,after", [("2x2", "1x2"), ("1x2", "2x2")])
def test_resume_on_another_topology_keeps_data_order_and_losses(uninterrupted, tmp_path, before,
                                                                after, sharding, repeat):
  workdir = str(tmp_path / "run")
  flags = SHARDING[sharding]
  run_on(before, workdir, *flags, f"--config.stop_at_step={STOP}")
  processes = {"2x2": 2, "1x2": 1}
  data = os.path.join(workdir, "checkpoints", str(STOP), "data")
  n = processes[before]
  assert sorted(os.listdir(data)) == ["commit_success.txt"] + [
      f"process_{i}-of-{n}.json" for i in range(n)]
  positions = {json.dumps(json.load(open(os.path.join(data, f"process_{i}-of-{n}.json"))))
               for i in range(n)}
  assert positions == {json.dumps({"next_index": STOP})}  # one global position
  log = run_on(after, workdir, *flags)
  assert f"resuming from checkpoint at step {STOP}" in log
  n = processes[after]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", str(STEPS), "data"))) == [
      "commit_success.txt"] + [f"process_{i}-of-{n}.json" for i in range(n)]
  info = read_metrics(workdir, "info")[0]  # written by the first invocation
  assert info["processes"] == processes[before] and info["devices"] == 2 * processes[before]

  got, want = _outputs(workdir), _outputs(uninterrupted(sharding))
  assert sorted(got[0]) == list(range(1, STEPS + 1))
  got_losses = np.array([got[0][s] for s in range(1, STEPS + 1)])
  want_losses = np.array([want[0][s] for s in range(1, STEPS + 1)])
  diffs = dict(
      max_loss_diff=float(np.max(np.abs(got_losses - want_losses))),
      max_param_diff=max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                         for a, b in zip(got[1], want[1])),
      max_logit_diff=float(np.max(np.abs(got[2] - want[2]))))
  rel.record("topology", before=before, after=after, sharding=sharding, repeat=repeat,
             stopped_at=STOP, steps=STEPS, **diffs)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
  np.testing.assert_array_equal(got[3], want[3])
  np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-5)


def test_multihost_dry_run_prints_commands(tmp_path):
  args = ["--", "--config", "configs/vit_cifar10.py", "--workdir", "/shared/runs/vit"]
  out = run_multihost("tpu", "--name", "pod", "--zone", "us-central2-b", "--dry-run", *args)
  assert out.returncode == 0, out.stderr
  assert "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all" in out.stdout
  assert "-m launch.train --config configs/vit_cifar10.py --workdir /shared/runs/vit " \
         "--distributed" in out.stdout
  script = tmp_path / "job.sbatch"
  out = run_multihost("slurm", "--nodes", "2", "--gpus_per_node", "4", "--script", str(script),
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
  out = run_multihost("local", "--num_processes", "2", "--port", "12345", "--dry-run", *args)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if "launch.train" in l]
  assert len(lines) == 2 and all("--coordinator_address=127.0.0.1:12345" in l for l in lines)
  assert "--process_id=0" in lines[0] and "--process_id=1" in lines[1]
