"""Faults a training run must survive, through the real launcher where it matters.

* SIGKILL at random moments, one of them while an asynchronous checkpoint is
  being written: the same command resumes from the newest complete checkpoint
  and ends with bitwise the same per-step losses, parameters and test logits
  as a run that was never stopped.
* SIGTERM (preemption notice): a checkpoint of the current step, a clear
  message, exit code 1; the restart loses no step.
* A damaged newest checkpoint (truncated or deleted files): the run resumes
  from the previous one, warning with both steps; the damaged one is moved
  aside, never deleted; a restart does not trip on it again.
* NaN/inf: the run stops naming the step and the metric; the last good
  checkpoint stays readable and finite.
* Bad input on the command line: exit code 2, one line, nothing written.
* One writer per workdir: a second command on a workdir in use stops in one
  line naming the holder and changes nothing; a killed holder's lock is taken
  over (one line) and the run resumes exactly; a holder on another host
  blocks until its lease ends; launch.evaluate and launch.export refuse a
  folder another process writes.

metrics.jsonl after a kill: the resumed run drops the lines written after the
checkpoint it restored (they are computed and written again), so the file
holds each train step exactly once; the tests check that.

Everything is tiny (width-32 depth-1 ViT on 16x16 synthetic images, 1 CPU
device per launcher process). RELIABILITY_REPEATS=N repeats the kill tests
(results/reliability.md).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import unavailable

from adaptive_vision import sharding as shd
from adaptive_vision import workdir_lock
from adaptive_vision.train import build, checkpointing, loop
from adaptive_vision.train.metrics import read_metrics
from configs import vit_cifar10
from test_workdir_lock import fake_lock, snapshot, start_holder

# Failed restores of damaged checkpoints leave orbax coroutines unawaited.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
TINY = {  # the same tiny model and data on the command line and in process
    "data.synthetic_train_size": 256, "data.synthetic_test_size": 64, "data.val_size": 64,
    "data.image_size": 16, "model.image_size": 16, "model.width": 32, "model.depth": 1,
    "model.num_heads": 2, "model.mlp_dim": 64, "batch_size": 16, "eval_batch_size": 64,
    "log_every": 1, "checkpoint_every": 2, "total_steps": STEPS,
}
REPEATS = int(os.environ.get("RELIABILITY_REPEATS", "1"))
TMP = ".orbax-checkpoint-tmp"


def tiny(**overrides):
  c = vit_cifar10.get_config("runlocal")
  for key, value in {**TINY, **overrides}.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.eval_splits = ("test",)
  return c


def train_cmd(workdir, *extra, config="configs/vit_cifar10.py:runlocal", tiny_flags=True):
  flags = [f"--config.{k}={v}" for k, v in TINY.items()] if tiny_flags else []
  if tiny_flags:
    flags.append("--config.eval_splits=('test',)")
  return [sys.executable, "-m", "launch.train", "--config", config,
          "--workdir", str(workdir), *flags, *extra]


def cli_env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  env.pop("XLA_FLAGS", None)  # one CPU device, like a plain `python -m launch.train`
  env["JAX_PLATFORMS"] = "cpu"
  return env


_started = []


@pytest.fixture(autouse=True)
def _no_stray_processes():
  yield
  while _started:
    proc = _started.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def start(workdir, *extra, log=None):
  log = open(log or f"{workdir}.log", "ab")
  proc = subprocess.Popen(train_cmd(workdir, *extra), cwd=REPO, env=cli_env(),
                          stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = log.name
  log.close()
  _started.append(proc)
  return proc


def finish(proc, timeout=300):
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise
  return proc.returncode, Path(proc.log_path).read_text()


def ckpt_entries(workdir):
  d = os.path.join(workdir, "checkpoints")
  return os.listdir(d) if os.path.isdir(d) else []


def complete_steps(workdir):
  return sorted(int(n) for n in ckpt_entries(workdir) if n.isdigit())


def writing(workdir):
  return [n for n in ckpt_entries(workdir) if TMP in n]


def wait_until(pred, proc, timeout=240, poll=0.002):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if pred():
      return True
    if proc.poll() is not None:
      return pred()
    time.sleep(poll)
  proc.kill()
  raise TimeoutError(f"condition not met in {timeout} s; log: {proc.log_path}")


def logged_steps(workdir):
  """Train steps in metrics.jsonl while the run may be writing it."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      text = f.read()
  except FileNotFoundError:
    return []
  return [json.loads(l)["step"] for l in text.splitlines(keepends=True)
          if l.endswith("\n") and '"kind": "train"' in l]


def train_losses(workdir):
  rows = read_metrics(workdir, "train")
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"train steps logged twice or out of order: {steps}"
  return {r["step"]: r["loss"] for r in rows}


def final_params(workdir):
  return jax.tree_util.tree_leaves(jax.device_get(
      checkpointing.restore_variables(workdir)["params"]))


def assert_same_run(workdir, reference):
  """Bitwise the same per-step losses, final parameters and test logits."""
  a, b = train_losses(reference), train_losses(workdir)
  assert sorted(b) == list(range(1, STEPS + 1))
  assert a == b
  for x, y in zip(final_params(reference), final_params(workdir)):
    np.testing.assert_array_equal(x, y)
  with np.load(os.path.join(reference, "test_logits.npz")) as fa, \
       np.load(os.path.join(workdir, "test_logits.npz")) as fb:
    np.testing.assert_array_equal(fa["exit_logits"], fb["exit_logits"])
    np.testing.assert_array_equal(fa["labels"], fb["labels"])


def record(name, **fields):
  """One JSON line per kill-test run in $RELIABILITY_LOG (for results/reliability.md)."""
  path = os.environ.get("RELIABILITY_LOG")
  if path:
    with open(path, "a") as f:
      f.write(json.dumps({"test": name, **fields}) + "\n")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same command, never interrupted."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  code, log = finish(start(workdir))
  assert code == 0, log
  return str(workdir)


# ----------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_sigkill_anytime_then_same_command_resumes_exactly(reference, tmp_path, repeat):
  rng = random.Random()
  workdir = str(tmp_path / "run")
  # Kill 1: as soon as a checkpoint is being written (an Orbax temporary
  # directory exists) once a complete one of step >= a random 2..10 exists.
  proc = start(workdir)
  after = rng.choice([2, 4, 6, 8, 10])
  wait_until(lambda: complete_steps(workdir) and complete_steps(workdir)[-1] >= after
             and writing(workdir), proc)
  proc.kill()
  proc.wait()
  left = writing(workdir)
  mid_write = bool(left)  # a temporary directory outlived the process: it died mid-write
  newest = complete_steps(workdir)[-1]
  redone1 = max(logged_steps(workdir)) - newest  # logged, not checkpointed: computed again
  # Kill 2: at a random moment once the resumed run has written a new checkpoint.
  proc = start(workdir)
  wait_until(lambda: complete_steps(workdir) and complete_steps(workdir)[-1] > newest, proc)
  delay = rng.uniform(0.0, 0.6)
  time.sleep(delay)
  killed2 = proc.poll() is None
  proc.kill()
  proc.wait()
  log2 = Path(proc.log_path).read_text()
  assert f"resuming from checkpoint at step {newest}" in log2
  assert log2.count("took over the lock of workdir") == 1  # the killed run's
  assert not set(left) & set(writing(workdir))  # the restart removed kill 1's leftovers
  newest2 = complete_steps(workdir)[-1]
  redone2 = max(logged_steps(workdir)) - newest2
  # The same command again, to the end.
  code, log = finish(start(workdir, log=str(tmp_path / "run3.log")))
  assert code == 0, log
  assert f"resuming from checkpoint at step {newest2}" in log
  assert log.count("took over the lock of workdir") == (1 if killed2 else 0)
  assert not writing(workdir)
  record("sigkill", repeat=repeat, kill1_after_ckpt=after, kill1_mid_write=mid_write,
         kill1_resumed_from=newest, kill1_steps_redone=redone1, kill2_delay_s=round(delay, 3),
         kill2_landed=killed2, kill2_resumed_from=newest2, kill2_steps_redone=redone2,
         steps=STEPS)
  assert_same_run(workdir, reference)


# ----------------------------------------------------------------------------- SIGTERM


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_sigterm_saves_current_step_and_restart_loses_nothing(reference, tmp_path, repeat):
  workdir = str(tmp_path / "run")
  proc = start(workdir)
  after = random.Random().randint(1, STEPS // 2)  # steps logged before the notice
  wait_until(lambda: len(logged_steps(workdir)) >= after, proc)
  proc.send_signal(signal.SIGTERM)
  code, log = finish(proc)
  assert code == 75, log  # EX_TEMPFAIL, not a crash's 1
  assert workdir_lock.read(workdir) is None  # released on the way out
  lines = [l for l in log.splitlines() if l.startswith("SIGTERM received")]
  assert len(lines) == 1, log
  step = int(lines[0].split("checkpoint at step ")[1].split()[0])
  assert "run the same command again to resume" in lines[0]
  assert step in complete_steps(workdir) and step == complete_steps(workdir)[-1]
  assert max(train_losses(workdir)) == step  # every step it logged is in the checkpoint
  code, log = finish(start(workdir, log=str(tmp_path / "run2.log")))
  assert code == 0, log
  assert f"resuming from checkpoint at step {step}" in log
  # The final record says the finishing process started at `step`, so its
  # wall clock is not mistaken for the run's (the reference started at 0).
  assert read_metrics(workdir, "final")[-1]["start_step"] == step
  assert read_metrics(reference, "final")[-1]["start_step"] == 0
  # One machine record per process start: which machine trained which steps.
  assert [r["step"] for r in read_metrics(workdir, "machine")] == [0, step]
  assert all(r["machine"] and r["device_kind"] for r in read_metrics(workdir, "machine"))
  record("sigterm", repeat=repeat, signal_after_logged_steps=after, saved_step=step,
         steps=STEPS)
  assert_same_run(workdir, reference)


def test_resume_drops_metric_lines_it_will_write_again(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 0, "kind": "info"}] + [{"step": s, "kind": "train", "loss": s}
                                           for s in range(1, 7)]
  lines += [{"step": 6, "kind": "eval"}, {"step": 6, "kind": "final"}]
  text = "".join(json.dumps(l) + "\n" for l in lines)
  cut = '{"step": 7, "kind": "tr'  # a kill in the middle of a write

  def rows():
    return [json.loads(l) for l in path.read_text().splitlines()]

  path.write_text(text + cut)
  assert loop._drop_metrics_after(str(tmp_path), 4) == 5
  assert rows() == lines[:5]  # info and steps 1-4: the restored checkpoint's
  path.write_text(text + cut)
  assert loop._drop_metrics_after(str(tmp_path), 6, redo_final=True) == 3
  assert rows() == lines[:7]
  path.write_text(text + cut)
  assert loop._drop_metrics_after(str(tmp_path), 0) == len(lines) + 1  # fresh start
  assert path.read_text() == ""
  path.write_text(text[:-1])  # last line complete but unterminated: appending must not glue
  assert loop._drop_metrics_after(str(tmp_path), 6) == 0
  assert path.read_text() == text


# ----------------------------------------------------------------------------- damage


def _array_files(step_dir):
  # Orbax/OCDBT keeps array bytes in state/d/ and state/ocdbt.process_*/d/.
  return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


def _truncate(paths):
  for p in paths:
    os.truncate(p, os.path.getsize(p) // 2)


DAMAGE = {
    "truncated array files": lambda d: _truncate(_array_files(d)),
    "deleted array files": lambda d: [os.remove(p) for p in _array_files(d)],
    "deleted state metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "deleted data-iterator file": lambda d: os.remove(glob.glob(os.path.join(d, "data", "*.json"))[0]),
    "deleted state directory": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


def _abstract_and_iterator(c):
  trainer = build.build(c)
  return trainer.restore_target(), trainer.train_iterator()


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """A run stopped at step 6 with checkpoints 2, 4, 6 (in process, 8 CPU devices)."""
  workdir = str(tmp_path_factory.mktemp("stopped") / "run")
  out = loop.train_and_evaluate(tiny(total_steps=8, stop_at_step=6), workdir)
  assert out.get("stopped_early") and complete_steps(workdir) == [2, 4, 6]
  return workdir


def test_damaged_newest_checkpoint_falls_back_and_keeps_both(stopped_run, tmp_path, caplog):
  intact, damaged = str(tmp_path / "intact"), str(tmp_path / "damaged")
  shutil.copytree(stopped_run, intact)
  shutil.copytree(stopped_run, damaged)
  DAMAGE["truncated array files"](os.path.join(damaged, "checkpoints", "6"))
  files_before = sorted(os.path.relpath(p, os.path.join(damaged, "checkpoints", "6"))
                        for p in glob.glob(os.path.join(damaged, "checkpoints", "6", "**"),
                                           recursive=True))
  with caplog.at_level("WARNING"):
    loop.train_and_evaluate(tiny(total_steps=8), damaged)  # the same command again
  warning = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warning) == 1 and "step 6" in warning[0] and "step 4" in warning[0], warning
  aside = glob.glob(os.path.join(damaged, "checkpoints", "6.damaged-*"))
  assert len(aside) == 1 and aside[0] in warning[0]
  assert sorted(os.path.relpath(p, aside[0]) for p in glob.glob(
      os.path.join(aside[0], "**"), recursive=True)) == files_before  # nothing deleted
  loop.train_and_evaluate(tiny(total_steps=8), intact)
  a, b = train_losses(intact), train_losses(damaged)
  assert sorted(b) == list(range(1, 9)) and a == b  # steps 5, 6 recomputed identically
  with np.load(os.path.join(intact, "test_logits.npz")) as fa, \
       np.load(os.path.join(damaged, "test_logits.npz")) as fb:
    np.testing.assert_array_equal(fa["exit_logits"], fb["exit_logits"])
  # Restarting again trips on nothing: the damaged copy is out of the way.
  caplog.clear()
  with caplog.at_level("WARNING"):
    abstract, it = _abstract_and_iterator(tiny(total_steps=8))
    ckpt = checkpointing.Checkpointer(os.path.join(damaged, "checkpoints"))
    assert ckpt.restore(abstract, it)[0] == 8
    ckpt.close()
  assert not [r for r in caplog.records if "is damaged" in r.getMessage()]
  # Nor does Orbax's "Item 'state' ... could not be restored" notice, which
  # reads as a failed restore while the state was restored.
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_kind_of_damage_is_detected_and_set_aside(stopped_run, tmp_path, damage):
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run, workdir)
  DAMAGE[damage](os.path.join(workdir, "checkpoints", "6"))
  abstract, it = _abstract_and_iterator(tiny(total_steps=8))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  step, state = ckpt.restore(abstract, it)
  ckpt.close()
  assert step == 4 and int(state.step) == 4
  assert complete_steps(workdir) == [2, 4]
  assert len(glob.glob(os.path.join(workdir, "checkpoints", "6.damaged-*"))) == 1


def test_no_loadable_checkpoint_is_an_error_that_moves_nothing(stopped_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run, workdir)
  for s in (2, 4, 6):
    DAMAGE["deleted array files"](os.path.join(workdir, "checkpoints", str(s)))
  before = sorted(ckpt_entries(workdir))
  with pytest.raises(checkpointing.CheckpointRestoreError, match=r"none of the checkpoints"):
    loop.train_and_evaluate(tiny(total_steps=8), workdir)
  assert sorted(ckpt_entries(workdir)) == before


# ----------------------------------------------------------------------------- NaN


def test_nan_names_step_and_metric_and_last_good_checkpoint_is_intact(tmp_path):
  workdir = str(tmp_path / "nan")
  c = tiny(total_steps=12, checkpoint_every=1)
  c.optim.update(lr=1e9, grad_clip=0.0, schedule="constant", warmup_steps=3)
  with pytest.raises(loop.NonFiniteError) as err:
    loop.train_and_evaluate(c, workdir)
  message = str(err.value)
  bad_step = int(message.split("step ")[1].split(":")[0])
  assert any(m in message.split(":")[1] for m in ("loss", "grad_norm", "param_norm")), message
  steps = complete_steps(workdir)
  assert steps and steps[-1] < bad_step, (steps, message)
  assert f"last good checkpoint (step {steps[-1]})" in message
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*.damaged-*"))
  assert not [n for n in ckpt_entries(workdir) if TMP in n]
  logged = train_losses(workdir)
  assert max(logged) < bad_step and all(np.isfinite(v) for v in logged.values())
  abstract, it = _abstract_and_iterator(c)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  step, state = ckpt.restore(abstract, it)
  ckpt.close()
  assert step == steps[-1]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


# ----------------------------------------------------------------------------- one writer


def _unchanged_by(workdir, command, **kwargs):
  """Runs `command` and checks that it changed nothing in `workdir` (names,
  bytes, modification times). Returns run_cli's result."""
  before = snapshot(workdir)
  result = command(**kwargs)
  assert snapshot(workdir) == before
  return result


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_a_second_command_on_a_busy_workdir_is_refused_and_changes_nothing(reference, tmp_path,
                                                                           repeat):
  """The same command started again while the first runs (a resubmitted job,
  a scheduler's restart before the old process died): the second stops in one
  line naming the first and writes nothing; the first ends as if alone."""
  workdir = str(tmp_path / "run")
  proc = start(workdir)
  after = random.Random().choice([2, 4, 6, 8, 10])
  wait_until(lambda: complete_steps(workdir) and complete_steps(workdir)[-1] >= after, proc)
  holder = workdir_lock.read(workdir)
  assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
  # Stopped while the second command runs, so that any change to the workdir is the second's.
  os.kill(proc.pid, signal.SIGSTOP)
  try:
    stopped_at = complete_steps(workdir)[-1]
    code, lines, stderr, seconds = _unchanged_by(
        workdir, lambda: run_cli(train_cmd(workdir)[3:]))
  finally:
    os.kill(proc.pid, signal.SIGCONT)
  assert code == 2, stderr
  assert lines == [
      f"error: workdir {workdir} is in use by pid {proc.pid} on host {socket.gethostname()}, "
      f"since {holder['since']}: wait for it to finish, stop it (kill {proc.pid}), or, if you "
      f"are sure it is dead, remove {workdir}/.lock; then run the same command again"], stderr
  code, log = finish(proc)
  assert code == 0, log
  assert "took over" not in log
  assert workdir_lock.read(workdir) is None and not glob.glob(f"{workdir}/.lock*")
  record("second_writer", repeat=repeat, first_stopped_at_checkpoint=stopped_at,
         refused_after_s=round(seconds, 1), steps=STEPS)
  assert_same_run(workdir, reference)


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_a_killed_holders_lock_is_taken_over_and_the_run_resumes_exactly(reference, tmp_path,
                                                                          repeat):
  workdir = str(tmp_path / "run")
  proc = start(workdir)
  after = random.Random().choice([2, 4, 6, 8, 10])
  wait_until(lambda: complete_steps(workdir) and complete_steps(workdir)[-1] >= after, proc)
  proc.kill()
  proc.wait()
  dead = workdir_lock.read(workdir)
  assert dead["pid"] == proc.pid  # SIGKILL runs no clean-up: the lock stays
  newest = complete_steps(workdir)[-1]
  code, log = finish(start(workdir, log=str(tmp_path / "run2.log")))
  assert code == 0, log
  assert [l for l in log.splitlines() if "took over" in l] == [
      f"took over the lock of workdir {workdir} from pid {proc.pid} on host "
      f"{socket.gethostname()}, since {dead['since']}: dead (the process is gone)"], log
  assert f"resuming from checkpoint at step {newest}" in log
  assert workdir_lock.read(workdir) is None and not glob.glob(f"{workdir}/.lock*")
  record("killed_holder", repeat=repeat, killed_after_checkpoint=after, resumed_from=newest,
         steps=STEPS)
  assert_same_run(workdir, reference)


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_a_holder_on_another_host_blocks_until_its_lease_ends(reference, tmp_path, repeat):
  """A lock naming another host (a shared filesystem): its pid means nothing
  here, its heartbeat does. Within its lease the run is refused; after it,
  the lock is taken over and the run goes on from its checkpoints."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference, workdir)
  rng = random.Random()
  age = rng.randint(5, 150)
  path, info = fake_lock(workdir, mtime_age=age, host="node-b.cluster", pid=4242,
                         boot_id="another-boot", job="SLURM_JOB_ID=777", lease_seconds=180.0)
  code, lines, stderr, seconds = _unchanged_by(workdir, lambda: run_cli(train_cmd(workdir)[3:]))
  assert code == 2, stderr
  assert len(lines) == 1, stderr
  match = re.fullmatch(
      rf"error: workdir {re.escape(workdir)} is in use by pid 4242 on host node-b\.cluster, "
      rf"job SLURM_JOB_ID=777, since {info['since']}, last heartbeat (\d+) s ago \(if it has "
      rf"died, its lease of 180 s ends in (\d+) s\): wait for it to finish or stop it on "
      rf"node-b\.cluster, or, if you are sure it is dead, remove {re.escape(path)}; then run "
      rf"the same command again", lines[0])
  assert match, lines[0]
  heard = int(match.group(1))
  assert age <= heard <= age + seconds + 1 and int(match.group(2)) == 180 - heard
  # The holder misses its heartbeats for longer than its lease.
  silent = rng.randint(181, 600)
  t = time.time() - silent
  os.utime(path, (t, t))
  code, log = finish(start(workdir, log=str(tmp_path / "run2.log")))
  assert code == 0, log
  took = [l for l in log.splitlines() if "took over" in l]
  assert len(took) == 1 and re.fullmatch(
      rf"took over the lock of workdir {re.escape(workdir)} from pid 4242 on host "
      rf"node-b\.cluster, job SLURM_JOB_ID=777, since {info['since']}: dead \(no heartbeat "
      rf"for \d+ s, lease 180 s\)", took[0]), log
  assert f"resuming from checkpoint at step {STEPS}" in log
  assert workdir_lock.read(workdir) is None
  record("other_host", repeat=repeat, heartbeat_age_s=age, refused_after_s=round(seconds, 1),
         silent_s=silent)
  assert_same_run(workdir, reference)


def test_evaluate_and_export_refuse_a_folder_another_process_writes(reference, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference, workdir)
  tiny_flags = train_cmd(workdir)[5:]  # --workdir W and the tiny --config.* flags

  def launch(name, *args):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", f"launch.{name}", "--config",
                           "configs/vit_cifar10.py:runlocal", *tiny_flags, *args], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stderr.splitlines()
             if l.strip() and not re.match(r"[IWEF]\d{4} ", l)]
    return proc.returncode, lines, proc.stderr, time.time() - t0

  holder = start_holder(workdir, env=cli_env())  # e.g. a run still training there
  _started.append(holder)
  code, lines, stderr, _ = _unchanged_by(workdir, lambda: launch("evaluate"))
  assert code == 2, stderr
  assert len(lines) == 1 and lines[0].startswith(
      f"error: workdir {workdir} is in use by pid {holder.pid} on host "), stderr
  holder.terminate()
  assert holder.wait(timeout=30) == 0
  params = tmp_path / "params"
  params.mkdir()
  holder = start_holder(str(params), ".tiny.npz.lock", env=cli_env())  # another export of it
  _started.append(holder)
  code, lines, stderr, _ = _unchanged_by(
      str(params), lambda: launch("export", f"--out={params}/tiny.npz"))
  assert code == 2, stderr
  assert len(lines) == 1 and lines[0].startswith(
      f"error: --out {params}/tiny.npz is in use by pid {holder.pid} on host "), stderr
  code, _, stderr, _ = launch("export", f"--out={params}/other.npz")  # another file: no wait
  assert code == 0, stderr
  assert sorted(os.listdir(params)) == [".tiny.npz.lock", "other.npz"]


# ----------------------------------------------------------------------------- bad input


def run_cli(args, timeout=120, **env):
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO,
                        env={**cli_env(), **env}, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stderr.splitlines()
           if l.strip() and not re.match(r"[IWEF]\d{4} ", l)]  # absl log lines
  return proc.returncode, lines, proc.stderr, time.time() - t0


BAD_INPUT = {
    "misspelled key": (["--config.optim.lrr=1"], r"--config.optim.lrr=1: unknown field 'lrr'; Did you mean \"lr\""),
    "unknown key": (["--config.nosuch=1"], r"--config.nosuch=1: unknown field 'nosuch'"),
    "wrong type": (["--config.batch_size=abc"], r"--config.batch_size=abc: invalid literal for int"),
    "bad config argument": (["--config", "configs/vit_cifar10.py:runlocal,epochz=3"],
                            r"unknown config argument 'epochz'"),
    "patch does not divide image": (["--config.data.image_size=18", "--config.model.image_size=18"],
                                    r"image size 18 is not divisible by patch size 4"),
    "cascade larger than the data": (["--config", "configs/ravit_cifar10.py:runlocal",
                                      "--config.data.image_size=24"],
                                     r"the largest input the model\(s\) read is 32x32 but "
                                     r"data.image_size=24; make them equal"),
    "dataset missing offline": (["--config", "configs/vit_cifar10.py",
                                 "--config.data.path={tmp}/no_cifar"],
                                r"data.path {tmp}/no_cifar does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, case):
  extra, pattern = BAD_INPUT[case]
  extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
  workdir = tmp_path / "w"
  args = ["--config", "configs/vit_cifar10.py:runlocal", "--workdir", str(workdir)]
  if "--config" in extra:
    args = args[2:]
  code, lines, stderr, seconds = run_cli(args + extra)
  assert code == 2, stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert re.search(pattern.replace("{tmp}", re.escape(str(tmp_path))), lines[0]), lines[0]
  assert not workdir.exists()
  assert seconds < 60


def test_workdir_of_another_model_is_refused_from_the_cli(reference, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  ckpts = workdir / "checkpoints"
  before = {p: os.path.getmtime(p) for p in glob.glob(f"{ckpts}/**", recursive=True)}
  metrics = (workdir / "metrics.jsonl").read_text()
  config = (workdir / "config.json").read_text()
  code, lines, stderr, _ = run_cli(train_cmd(workdir, "--config.model.width=48")[3:])
  assert code == 2, stderr
  assert len(lines) == 1 and "holds checkpoints of a different model" in lines[0], stderr
  assert {p: os.path.getmtime(p) for p in glob.glob(f"{ckpts}/**", recursive=True)} == before
  assert (workdir / "metrics.jsonl").read_text() == metrics
  assert (workdir / "config.json").read_text() == config


# ----------------------------------------------------------------------------- topology


def _legacy_multiprocess(step_dir):
  """Makes a checkpoint look written by two processes of the per-process data
  layout of older versions: two data-iterator files, no data_order metadata."""
  data = os.path.join(step_dir, "data")
  (only,) = glob.glob(os.path.join(data, "process_*-of-*.json"))
  for i in range(2):
    shutil.copy(only, os.path.join(data, f"process_{i}-of-2.json"))
  os.remove(only)
  meta_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["custom_metadata"].pop("data_order")
  with open(meta_path, "w") as f:
    json.dump(meta, f)


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_a_data_order_that_cannot_continue_is_refused_in_one_line(stopped_run, tmp_path, repeat):
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run, workdir)
  with open(os.path.join(workdir, "checkpoints", "6", "_CHECKPOINT_METADATA")) as f:
    assert json.load(f)["custom_metadata"]["data_order"] == {
        "layout": checkpointing.DATA_LAYOUT, "global_batch_size": 16, "processes": 1}
  for s in (2, 4, 6):
    _legacy_multiprocess(os.path.join(workdir, "checkpoints", str(s)))
  before = sorted(ckpt_entries(workdir))
  with pytest.raises(checkpointing.DataOrderError) as err:
    loop.train_and_evaluate(tiny(total_steps=8), workdir)
  message = str(err.value)
  assert "\n" not in message and "step 6" in message and "2 processes" in message
  assert "allow_config_change=True" in message, message
  assert isinstance(err.value, ValueError)  # the launcher: one `error:` line, exit code 2
  assert sorted(ckpt_entries(workdir)) == before  # nothing set aside as damaged
  # Deliberately accepted: resumes from step 6 in the global order.
  out = loop.train_and_evaluate(tiny(total_steps=8, allow_config_change=True), workdir)
  assert out["step"] == 8 and complete_steps(workdir)[-1] == 8
  record("data_order_refusal", repeat=repeat, message=message)


def test_data_order_refusal_cases():
  refuse = checkpointing.data_order_refusal
  new = {"layout": checkpointing.DATA_LAYOUT, "global_batch_size": 16, "processes": 2}
  assert refuse(new, 2, 6, 16) is None  # any process count reads it
  assert refuse(None, 1, 6, 16) is None  # one process of the old layout: the same order
  assert "2 processes" in refuse(None, 2, 6, 16)
  assert "global batch 16" in refuse(new, 2, 6, 32)
  assert "does not read" in refuse({**new, "layout": "other"}, 2, 6, 16)


def test_restore_lays_the_state_out_on_the_new_mesh(tmp_path):
  """Saved FSDP-sharded over 8 devices; restored onto 2 (FSDP), 4 (replicated), 1."""
  from jax.sharding import PartitionSpec as P
  c = tiny(total_steps=8, param_sharding="fsdp")
  c.model.update(width=128, mlp_dim=256)  # kernels of 32768 >= 2**14 values get split
  trainer = build.build(c)
  init, abstract = trainer.init_fn, trainer.abstract_state

  def shardings(data, strategy):
    return shd.state_shardings(abstract, shd.make_mesh(dict(data=data, model=1)), strategy)

  saved = shardings(8, "fsdp")
  assert any(s.spec != P() for s in jax.tree_util.tree_leaves(saved.params))
  state = jax.jit(init, out_shardings=saved)(jax.random.PRNGKey(0))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), global_batch_size=16)
  ckpt.save(1, state)
  ckpt.close()
  want = jax.device_get(state)
  for data, strategy in ((2, "fsdp"), (4, "replicate"), (1, "fsdp")):
    target = shardings(data, strategy)
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), global_batch_size=16)
    step, got = ckpt.restore(jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, target))
    ckpt.close()
    assert step == 1
    for a, s, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(target),
                       jax.tree_util.tree_leaves(want)):
      assert a.sharding.is_equivalent_to(s, a.ndim), (data, strategy, a.sharding, s)
      np.testing.assert_array_equal(np.asarray(a), b)


# ----------------------------------------------------------------------------- full disk


def _mount(*args):
  return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
  """A 32 MB tmpfs of the test's own (needs root); unmounted afterwards."""
  disk = tmp_path / "disk"
  disk.mkdir()
  out = _mount("-t", "tmpfs", "-o", "size=32m", "tmpfs", disk)
  if out.returncode:
    unavailable(f"a tmpfs mount for the full-disk tests (root; {out.stderr.strip()})")
  yield disk
  # Recursively (a bind mount inside); lazily when a run still holds files there.
  if subprocess.run(["umount", "-R", str(disk)], capture_output=True).returncode:
    subprocess.run(["umount", "-R", "-l", str(disk)], capture_output=True)


def _fill(folder, stop):
  """Keeps the filesystem of `folder` full until `stop()` (space freed by the
  run, e.g. a removed temporary directory, is taken again)."""
  fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
  try:
    while not stop():
      for size in (1 << 20, 1 << 16, 4096, 512, 1):
        try:
          while True:
            os.write(fd, b"\0" * size)
        except OSError:
          pass
      time.sleep(0.02)
  finally:
    os.close(fd)


FULL_DISK = {
    # fault: (flags, the fault starts once a checkpoint of at least this step is complete)
    "disk full": ([], lambda rng: rng.choice([2, 4, 6, 8, 10])),
    # 8 steps between checkpoints: metrics.jsonl often needs a new page first
    "disk full, checkpoint every 8": (["--config.checkpoint_every=8"], lambda rng: 8),
    # A folder that becomes unwritable under a running job: see
    # test_unwritable_folder_stops_in_one_line_and_same_command_resumes.
}


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("fault", list(FULL_DISK))
def test_full_disk_stops_in_one_line_and_same_command_resumes(reference, small_disk, tmp_path,
                                                               fault, repeat):
  import threading
  extra, when = FULL_DISK[fault]
  workdir = str(small_disk / "run")
  after = when(random.Random())
  proc = start(workdir, *extra, log=str(tmp_path / "run1.log"))
  wait_until(lambda: complete_steps(workdir) and complete_steps(workdir)[-1] >= after, proc)
  ckpts = os.path.join(workdir, "checkpoints")
  filler = threading.Thread(target=_fill, args=(small_disk, lambda: proc.poll() is not None))
  filler.start()
  code, log = finish(proc)
  filler.join()
  errors = [l for l in log.splitlines() if l.startswith("error:")]
  assert code == 4 and len(errors) == 1, log[-3000:]
  line = errors[0]
  # error: could not write the checkpoint of step N to W/checkpoints: ..., or
  # could not write step N to W/metrics.jsonl (or W/tensorboard): ..., or (at the
  # end) could not write W/test_logits.npz: ..., or (removing old checkpoints
  # failed) the checkpoint of step N in W/checkpoints is complete, but ...
  what = re.match(r"error: (?:could not write (?:the checkpoint of step (\d+) to |step (\d+) to )?|"
                  r"the checkpoint of step (\d+) in )"
                  rf"{re.escape(workdir)}/(checkpoints|metrics\.jsonl|tensorboard|\w+\.npz)[: ]",
                  line)
  assert what, line
  step = int(what.group(1) or what.group(2) or what.group(3) or STEPS)
  kept = int(re.search(r"the checkpoint of step (\d+) is intact", line).group(1))
  assert "No space left on device" in line and "run the same command again to resume" in line, line
  listing = sorted(os.path.relpath(p, ckpts) for p in glob.glob(f"{ckpts}/**", recursive=True))
  assert kept == complete_steps(workdir)[-1] and after <= kept <= step, (line, listing)
  # The checkpoint left standing loads (read on the still-broken disk).
  params = jax.tree_util.tree_leaves(checkpointing.restore_variables(workdir, step=kept)["params"])
  assert all(np.isfinite(np.asarray(p)).all() for p in params)
  # Space is back: the same command resumes and ends exactly like the run that
  # never stopped.
  os.remove(small_disk / "filler")
  code, log = finish(start(workdir, log=str(tmp_path / "run2.log")))
  assert code == 0, log[-3000:]
  assert f"resuming from checkpoint at step {kept}" in log
  assert not writing(workdir)
  record("full_disk", fault=fault, repeat=repeat, fault_after_ckpt=after, failed_file=what.group(4),
         failed_step=step, committed="is complete" in line, resumed_from=kept, line=line)
  assert_same_run(workdir, reference)


def _chattr(flag, path):
  return subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_unwritable_folder_stops_in_one_line_and_same_command_resumes(reference, tmp_path,
                                                                      repeat):
  """The checkpoints folder turns unwritable under the running job (immutable
  flag: even root cannot create or remove entries, the way a folder remounted
  read-only behaves; a read-only remount itself is refused while the run holds
  files there)."""
  workdir = tmp_path / "run"
  ckpts = workdir / "checkpoints"
  after = random.Random().choice([2, 4, 6, 8])
  proc = start(workdir, log=str(tmp_path / "run1.log"))
  wait_until(lambda: complete_steps(str(workdir)) and complete_steps(str(workdir))[-1] >= after,
             proc)
  out = _chattr("+i", ckpts)
  if out.returncode:
    proc.kill()
    unavailable(f"chattr +i for the unwritable-folder test ({out.stderr.strip()})")
  try:
    code, log = finish(proc)
    listing = sorted(os.listdir(ckpts))
  finally:
    _chattr("-i", ckpts)
  errors = [l for l in log.splitlines() if l.startswith("error:")]
  assert code == 4 and len(errors) == 1, log[-3000:]
  line = errors[0]
  what = re.match(rf"error: (?:could not write the checkpoint of step (\d+) to |"
                  rf"the checkpoint of step (\d+) in ){re.escape(str(ckpts))}[: ]", line)
  assert what, line
  assert "Operation not permitted" in line and "run the same command again to resume" in line, line
  kept = int(re.search(r"the checkpoint of step (\d+) is intact", line).group(1))
  assert kept == complete_steps(str(workdir))[-1] and kept >= after, (line, listing)
  params = jax.tree_util.tree_leaves(
      checkpointing.restore_variables(str(workdir), step=kept)["params"])
  assert all(np.isfinite(np.asarray(p)).all() for p in params)
  # The folder is writable again: the same command resumes and ends exactly
  # like the run that never stopped.
  code, log = finish(start(workdir, log=str(tmp_path / "run2.log")))
  assert code == 0, log[-3000:]
  assert f"resuming from checkpoint at step {kept}" in log
  assert not writing(str(workdir))
  record("unwritable_folder", repeat=repeat, fault_after_ckpt=after, resumed_from=kept,
         committed="is complete" in line, line=line)
  assert_same_run(str(workdir), reference)


def test_a_save_past_orbax_time_limit_is_named_so_not_a_disk_problem(tmp_path, monkeypatch):
  """Orbax measures its async-save limit in wall time, so a paused process
  trips it; the error says that, and the advice is to resume (not to free
  space)."""
  from adaptive_vision import atomic
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt._writing = 1800  # a save in flight

  def timed_out():
    raise TimeoutError("ChainedFuture completed 0/1 futures but timed out after 1450.98 seconds.")
  monkeypatch.setattr(ckpt.manager, "wait_until_finished", timed_out)
  with pytest.raises(checkpointing.SaveTimeoutError) as err:
    ckpt.wait()
  message = str(err.value)
  assert isinstance(err.value, atomic.WriteError)  # launch.train's one-line error path
  assert "step 1800" in message and "did not finish within" in message, message
  assert "paused" in message and "timed out after 1450.98 seconds" in message, message
  monkeypatch.undo()
  advice = loop._intact(ckpt, err.value)
  assert advice == "no checkpoint was written yet; run the same command again to resume", advice
  assert "free space" in loop._intact(ckpt, atomic.WriteError("No space left on device"))
  ckpt.close()


def test_metrics_line_on_a_full_disk_names_file_and_step(small_disk):
  from adaptive_vision import atomic
  from adaptive_vision.train.metrics import MetricWriter
  writer = MetricWriter(str(small_disk), tensorboard=False)
  fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
  with pytest.raises(atomic.WriteError) as err:
    for step in range(1, 100_000):
      if step == 2:  # full once a line is in: appends fail when a new page is needed
        for size in (1 << 20, 4096, 1):
          try:
            while True:
              os.write(fd, b"\0" * size)
          except OSError:
            pass
      writer.write(step, "train", {"loss": 1.0, "note": "x" * 200})
  os.close(fd)
  message = str(err.value)
  assert re.fullmatch(rf"could not write step \d+ to {re.escape(str(small_disk))}/metrics.jsonl: "
                      "No space left on device", message), message
  with pytest.raises(atomic.WriteError, match="could not finish writing"):
    writer.close()  # the cut line is still buffered
  os.remove(small_disk / "filler")
  # Lines are whole up to the failed one; a resumed run drops a cut-short end.
  loop._drop_metrics_after(str(small_disk), 10**9)
  rows = read_metrics(str(small_disk))
  assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


# ----------------------------------------------------------------------------- bad data


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """A tiny folder dataset (16x16 PNGs, 3 classes) for the trainer."""
  from PIL import Image
  root = tmp_path_factory.mktemp("folder") / "data"
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("test", 4)):
    for c in ("ant", "bee", "cat"):
      (root / split / c).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / split / c / f"{i:03d}.png")
  return root


FOLDER_FLAGS = ["--config.data.name=tiny_folder",
                "--config.data.num_classes=3", "--config.model.num_classes=3",
                "--config.data.val_size=6", "--config.data.image_size=16",
                "--config.model.image_size=16", "--config.batch_size=8"]


@pytest.mark.parametrize("case", ["truncated image mid-folder", "label outside the classes"])
def test_bad_data_is_reported_with_its_path_before_training(image_folder, tmp_path, case):
  root = tmp_path / "data"
  shutil.copytree(image_folder, root)
  flags = [f"--config.data.path={root}", *FOLDER_FLAGS]
  if case == "truncated image mid-folder":
    bad = root / "train" / "bee" / "005.png"  # entry 17 of 36: mid-folder
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    pattern = rf"cannot decode image {re.escape(str(bad))}: .*; fix or remove the file"
  else:
    flags = [f.replace("num_classes=3", "num_classes=2") for f in flags]
    pattern = (rf"12 of 36 labels in {re.escape(str(root / 'train'))} are outside \[0, 2\) "
               rf"\(in {re.escape(str(root / 'train' / 'cat'))} \(12 files\)\): "
               r"set data.num_classes=3")
  workdir = tmp_path / "w"
  code, lines, stderr, seconds = run_cli(["--config", "configs/vit_cifar10.py",
                                          "--workdir", str(workdir), *flags],
                                         ADAPTIVE_VISION_CACHE=str(tmp_path / "cache"))
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert re.search(pattern, lines[0]), lines[0]
  assert not workdir.exists()  # found while caching, before anything was trained or written
  if "truncated" in case:  # the conversion did not commit a cache without the file
    assert not list((tmp_path / "cache").rglob("meta.json"))
  record("bad_data", case=case, line=lines[0], seconds=round(seconds, 1))
