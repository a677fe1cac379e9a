r"""Runs launch.train on several processes: a TPU VM pod, a SLURM GPU allocation, or
several CPU processes on this machine. Every process runs the same command with
--distributed; only how the processes are started differs.

  # TPU VM pod slice (every worker; jax finds the pod by itself):
  python -m launch.multihost tpu --name my-tpu --zone us-central2-b \
      [--project P] [--repo_dir '~/adaptive_vision'] [--dry-run] -- \
      --config configs/vit_cifar10.py --workdir /mnt/shared/runs/vit

  # SLURM, one process per GPU (writes an sbatch script, submits it with sbatch):
  python -m launch.multihost slurm --nodes 2 --gpus_per_node 8 [--partition P] \
      [--time 24:00:00] [--script run.sbatch] [--dry-run] -- \
      --config configs/vit_cifar10.py --workdir /shared/runs/vit

  # N CPU processes on localhost (tests, debugging the multi-process path):
  python -m launch.multihost local --num_processes 2 --devices_per_process 2 \
      [--dry-run] -- --config configs/vit_cifar10.py:runlocal --workdir /tmp/mp

Everything after `--` goes to `python -m launch.train` unchanged. With --dry-run
the commands (and the sbatch script) are printed, not run.

What the processes need (docs/scale_out.md): the same code and config on every
host; one --workdir that every process reads and writes under the same path
(NFS/Filestore, or a gcsfuse mount on TPU VMs: checkpoints are written by every
process, metrics by process 0); the global batch divisible by the number of
processes (each reads its own rows of every global batch). A restart is the
same command: it resumes from the newest checkpoint, also on another number of
processes or devices. Preemption: SLURM sends SIGTERM
(--signal) before the time limit, the trainer saves and exits, --requeue
starts the job again; TPU VMs get SIGTERM on maintenance events.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence



def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tpu_commands(args, train_args: Sequence[str]) -> list[list[str]]:
  """gcloud commands: copy the checkout to every worker, then train on every worker."""
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  remote = (f"cd {args.repo_dir} && {args.python} -m launch.train "
            f"{shlex.join(list(train_args))} --distributed")
  commands = []
  if args.copy:
    commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *where,
                     "--worker=all", args.copy, f"{args.name}:{args.repo_dir}"])
  commands.append(["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *where,
                   "--worker=all", f"--command={remote}"])
  return commands


def slurm_script(args, train_args: Sequence[str]) -> str:
  """An sbatch script: one task per GPU; coordinator, process count and id from SLURM."""
  directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
                f"--ntasks-per-node={args.gpus_per_node}", f"--gres=gpu:{args.gpus_per_node}",
                f"--cpus-per-task={args.cpus_per_task}", f"--time={args.time}",
                # SIGTERM to every task 5 minutes before the time limit: the trainer
                # saves a checkpoint and exits; --requeue runs the job again.
                "--signal=TERM@300", "--requeue", "--open-mode=append",
                f"--output={args.log}"]
  if args.partition:
    directives.append(f"--partition={args.partition}")
  return "\n".join([
      "#!/bin/bash",
      *[f"#SBATCH {d}" for d in directives],
      "set -euo pipefail",
      f"cd {shlex.quote(os.path.abspath(args.repo_dir))}",
      "# Process 0 runs the coordinator on the first node of the allocation.",
      'COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
      f"PORT={args.port}",
      f"TRAIN=({shlex.join([args.python, '-m', 'launch.train', *train_args])})",
      "# One task per GPU: task i is process $SLURM_PROCID of $SLURM_NTASKS and uses",
      "# GPU $SLURM_LOCALID of its node (these variables differ per task, hence bash -c).",
      "srun --kill-on-bad-exit=1 bash -c 'JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID exec \"$@\" \\",
      "  --process_id=$SLURM_PROCID --num_processes=$SLURM_NTASKS' bash \\",
      '  "${TRAIN[@]}" --distributed --coordinator_address="$COORDINATOR:$PORT"',
      ""])


def local_commands(args, train_args: Sequence[str], port: int) -> list[tuple[dict, list[str]]]:
  """(extra environment, command) for each of the N processes on localhost."""
  out = []
  for i in range(args.num_processes):
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}",
           "JAX_PLATFORMS": "cpu"}
    out.append((env, [args.python, "-m", "launch.train", *train_args, "--distributed",
                      f"--coordinator_address=127.0.0.1:{port}",
                      f"--num_processes={args.num_processes}", f"--process_id={i}"]))
  return out


def run_local(commands, timeout: float) -> int:
  """Starts the processes; when one fails, stops the others (a lone process would
  wait forever in a collective). Returns the first non-zero exit code, else 0."""
  procs = []
  for extra, cmd in commands:
    env = dict(os.environ)
    env.update(extra)
    procs.append(subprocess.Popen(cmd, env=env))
  deadline = time.time() + timeout
  code = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed or time.time() > deadline:
        code = failed[0] if failed else 124
        print(f"multihost: {'a process exited with ' + str(code) if failed else 'timeout'}; "
              "stopping the others", file=sys.stderr, flush=True)
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    cut = argv.index("--")
    argv, train_args = argv[:cut], argv[cut + 1:]
  else:
    train_args = []
  parser = argparse.ArgumentParser(prog="python -m launch.multihost",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--python", default="python", help="python on the hosts")
  sub = parser.add_subparsers(dest="where", required=True)
  tpu = sub.add_parser("tpu", help="all workers of a TPU VM (pod slice) via gcloud ssh")
  tpu.add_argument("--name", required=True, help="TPU VM name")
  tpu.add_argument("--zone", required=True)
  tpu.add_argument("--project", default=None)
  tpu.add_argument("--repo_dir", default="~/adaptive_vision",
                   help="checkout on the workers (same path on each)")
  tpu.add_argument("--copy", default=None,
                   help="local checkout to copy to every worker first (gcloud scp)")
  slurm = sub.add_parser("slurm", help="sbatch job, one process per GPU")
  slurm.add_argument("--nodes", type=int, required=True)
  slurm.add_argument("--gpus_per_node", type=int, required=True)
  slurm.add_argument("--cpus_per_task", type=int, default=8)
  slurm.add_argument("--partition", default=None)
  slurm.add_argument("--time", default="24:00:00")
  slurm.add_argument("--job_name", default="adaptive_vision")
  slurm.add_argument("--log", default="slurm-%j.out")
  slurm.add_argument("--port", type=int, default=12355, help="coordinator port")
  slurm.add_argument("--repo_dir", default=".", help="checkout, on a shared filesystem")
  slurm.add_argument("--script", default=None, help="also write the sbatch script here")
  local = sub.add_parser("local", help="N CPU processes on this machine")
  local.add_argument("--num_processes", type=int, default=2)
  local.add_argument("--devices_per_process", type=int, default=1)
  local.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  local.add_argument("--timeout", type=float, default=3600)
  for p in (tpu, slurm, local):
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print what would run, run nothing")
  args = parser.parse_args(argv)
  if not any(a.startswith("--workdir") for a in train_args):
    parser.error("give the launch.train flags after '--', at least --config and --workdir")

  if args.where == "tpu":
    commands = tpu_commands(args, train_args)
    for cmd in commands:
      print(shlex.join(cmd), flush=True)
    if args.dry_run:
      return 0
    for cmd in commands:
      code = subprocess.call(cmd)
      if code:
        return code
    return 0
  if args.where == "slurm":
    script = slurm_script(args, train_args)
    if args.script:
      from adaptive_vision import atomic
      atomic.write_text(args.script, script)
    print(script, flush=True)
    sbatch = ["sbatch", args.script] if args.script else ["sbatch"]
    print(shlex.join(sbatch) + ("" if args.script else " <<'EOF' (the script above)"), flush=True)
    if args.dry_run:
      return 0
    return subprocess.run(sbatch, input=None if args.script else script, text=True).returncode
  port = args.port or free_port()
  commands = local_commands(args, train_args, port)
  for extra, cmd in commands:
    print(" ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()), shlex.join(cmd), flush=True)
  if args.dry_run:
    return 0
  return run_local(commands, args.timeout)


if __name__ == "__main__":
  sys.exit(main())
