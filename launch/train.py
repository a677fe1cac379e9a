r"""Train and evaluate a config.

  python -m launch.train --config configs/vit_cifar10.py[:ARGS] --workdir DIR \
      [--config.key=value ...] [--distributed [--coordinator_address=HOST:PORT \
       --num_processes=N --process_id=I]] [--cpu_devices=N]

Started again with the same command, a run resumes from the newest complete
checkpoint in DIR (after a crash, a kill or a preemption alike).

One process writes a workdir: the run holds DIR/.lock while it runs (in
multi-process runs, process 0 holds it for all). A second command on DIR
stops with one line naming the holder (host, pid, since when) and writes
nothing. A holder that was killed leaves its lock behind; the next run takes
it over (one line says so) and resumes as usual. A holder on another host
(a shared filesystem) counts as dead once it has not renewed the lock for
workdir_lock.lease_seconds (default 180; renewed every heartbeat_seconds, 30);
see adaptive_vision/workdir_lock.py.

Exit codes: 0 done; 2 bad input (flags, config, data, workdir of another model,
unreadable checkpoints, a data order that cannot continue on this topology)
or a workdir in use by another live process, one line on stderr, nothing
trained or written (also 2: a run whose lock another host took over after
it failed to renew it for a whole lease stops at once); 3 loss or gradients became NaN/inf (the
last good checkpoint is kept); 75 SIGTERM (EX_TEMPFAIL: a checkpoint of the
current step was saved; run the same command again; a crash exits 1); 4 a checkpoint, metrics line or result
could not be written (disk full, read-only folder): one line naming the file
and the step; the newest complete checkpoint is intact, and the same command
resumes once there is space.

The number of processes and devices may change between invocations (a
preemptible slice that comes back another size): the state is laid out on the
new mesh and the data order, a function of the global batch, stays the same.

Multi-process runs (TPU pods, SLURM, several CPU processes): every process runs
this same command with --distributed; see launch/multihost.py and docs/scale_out.md.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from launch import common

config_flags.DEFINE_config_file("config", None, "config file [:args]", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logits go")
flags.DEFINE_bool("distributed", False,
                  "call jax.distributed.initialize() (multi-host; detects TPU pods and "
                  "SLURM by itself, or takes the three flags below)")
flags.DEFINE_string("coordinator_address", None,
                    "with --distributed: HOST:PORT of process 0's coordinator service")
flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")
flags.DEFINE_integer("cpu_devices", 0,
                     "CPU-only hosts: split the host into N XLA devices and shard the batch "
                     "over them (faster on CPU, see results/bench_notes.md); 0: one device")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(v is not None for v in explicit) and not FLAGS.distributed:
    common.fail("--coordinator_address/--num_processes/--process_id need --distributed")
  common.setup(FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
               cpu_devices=FLAGS.cpu_devices)
  from adaptive_vision.train import loop
  config = FLAGS.config
  try:
    summary = loop.train_and_evaluate(config, FLAGS.workdir)
  except loop.Preempted as e:
    # Its own code, so that a scheduler requeues a preempted run and not a crash (1).
    print(e, file=sys.stderr, flush=True)
    sys.exit(loop.Preempted.EXIT_CODE)
  except loop.NonFiniteError as e:
    common.fail(str(e), code=3)
  except (ValueError, FileNotFoundError) as e:
    common.fail(str(e))
  except common.WriteError as e:
    common.fail(str(e), code=4)
  import jax
  if jax.process_index() != 0:
    return
  if summary.get("stopped_early"):
    print(f"stopped at step {summary['step']} (stop_at_step); run the same command "
          "without it to continue", file=sys.stderr)
    return
  test = summary.get("test", {})
  print(f"done: step {summary['step']}, test accuracy {100 * test.get('accuracy', float('nan')):.2f}%"
        f", {summary['train_seconds']:.0f} s training; outputs in {FLAGS.workdir}", file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  common.run(main)
