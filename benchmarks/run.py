r"""The benchmark runner: one section at a time, or all of them.

  python -m benchmarks.run all [--quick] [--out results/bench_cpu.json]
  python -m benchmarks.run train|loop|latency|batched [--quick] [--out ...]

Each section measures on this machine, then writes itself into the results
JSON (other sections kept) with its command and the machine, judges the
targets of configs/benchmarks.py and rewrites the Markdown beside it (.md).
`all` runs the sections one after the other, each in a process of its own
(their process settings differ). `--quick` shrinks every section to a smoke
test (configs/benchmarks.py:quick) whose figures are not judged; it writes
results/bench_cpu_quick.json unless --out says otherwise. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import shlex
import subprocess
import sys

# section -> the function that measures it (module:function)
SECTIONS = {"train": "train:measure", "loop": "loop:measure", "latency": "inference:latency",
            "batched": "inference:batched"}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("section", choices=tuple(SECTIONS) + ("all",))
  p.add_argument("--quick", action="store_true", help="smoke test: tiny rounds, not judged")
  p.add_argument("--out", default=None, help="results JSON (default results/bench_cpu.json)")
  args = p.parse_args(argv)
  out = args.out or f"results/bench_cpu{'_quick' if args.quick else ''}.json"
  if args.section == "all":
    failed = [s for s in SECTIONS if subprocess.run(
        [sys.executable, "-m", "benchmarks.run", s, "--out", out]
        + ["--quick"] * args.quick).returncode]
    if failed:
      print(f"sections that failed: {failed}", file=sys.stderr)
    return int(bool(failed))
  from benchmarks import common, report
  from configs import benchmarks as targets_config
  cfg = targets_config.get_config("quick" if args.quick else None)
  head = dict(command=shlex.join(["python", "-m", "benchmarks.run"] + argv),
              started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              machine=common.machine(), quick=cfg.quick)
  module, function = SECTIONS[args.section].split(":")
  section = dict(head, **getattr(importlib.import_module(f"benchmarks.{module}"), function)(cfg))
  results = report.write(out, args.section, section)
  for t in results["targets"]:
    if t["section"] == args.section:
      common.log(f"{t['name']}: {t['summary']}")
  common.log(f"wrote the {args.section} section of {out} and its .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
