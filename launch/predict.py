r"""Classify image files with a trained early-exit model, one image at a time.

  python -m launch.predict --params results/params/ravit_cifar10.npz IMAGE_OR_FOLDER... \
      [--budget 0.55 | --threshold T] [--config configs/ravit_cifar10.py]

For each image (folders are searched recursively for .png, .jpg, ... files,
in sorted order) prints one line on stdout, tab-separated:

  path  class  exit k of E  M.MM MMACs

the class, the exit taken (0 = the cheapest of the E exits) and the MACs
spent to get there, running the real dynamic cascade
(`inference.SingleDispatchCascade`: later branches or stages run only for
the images that need them). Images are resized to each branch's resolution
exactly as the eval pipeline does (`data.load_image`).

Thresholds: --budget B takes the per-exit thresholds that launch.export
calibrated on the validation split for mean MACs <= B x the reference MACs
(stored in the params file, for its exit rule: softmax entropy below the
threshold, or the top softmax probability above it); --threshold T one shared entropy
threshold (an image exits where the entropy of its softmax is below T);
neither: the file's first calibrated budget. Works for RAViT cascades, the
plain ViT (one exit) and the ERDE ResNets.

The parameters file describes itself (the config it was trained with); a
--config given is checked against it.

Exit codes: 0 done; 2 bad input (not an image, a folder without images,
parameters of another model, unknown budget), one line on stderr.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from launch import common

config_flags.DEFINE_config_file("config", None, "optional: config file [:args] the params "
                                "were exported with (default: the one stored in the file)",
                                lock_config=True)
flags.DEFINE_string("params", None, "parameters file of launch.export (.npz)")
flags.DEFINE_float("budget", None, "MACs budget calibrated at export (e.g. 0.55)")
flags.DEFINE_float("threshold", None, "one shared entropy threshold for every early exit")
FLAGS = flags.FLAGS


def main(argv):
  paths = argv[1:]
  if not paths:
    common.fail("name at least one image or folder: python -m launch.predict "
                "--params FILE IMAGE_OR_FOLDER...")
  common.setup(workload="serve")  # each image's answer before the next image
  from adaptive_vision import data as data_lib
  from adaptive_vision import classify, export, models
  with common.clear_errors():
    files = data_lib.image_files(paths)
    config = FLAGS.config
    if config is None:
      config = common.config_from_params(FLAGS.params)
    variables, meta = export.load(FLAGS.params, config)
    num_exits = models.num_exits(config.model)
    thresholds, criterion, what = export.thresholds_for(
        meta, num_exits, budget=FLAGS.budget, threshold=FLAGS.threshold, path=FLAGS.params)
    examples = classify.load_images(config, files)  # every error before any output
    print(f"{len(files)} images; {num_exits} exits; {what}", file=sys.stderr, flush=True)
    rows = classify.predict_files(config, variables, files, thresholds,
                                 criterion=criterion, class_names=meta.get("class_names"),
                                 examples=examples)
    spent, exits = 0.0, [0] * num_exits
    for row in rows:
      print(classify.format_row(row), flush=True)
      spent += row["macs"]
      exits[row["exit"]] += 1
  n = max(len(files), 1)
  print(f"exits taken: {', '.join(f'{100 * c / n:.0f}%' for c in exits)}; mean "
        f"{spent / n / 1e6:.2f} MMACs per image", file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flags_as_required(["params"])
  common.run(main)
