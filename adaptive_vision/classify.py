"""Early-exit predictions for image files, one image at a time (`launch.predict`).

Each image is preprocessed exactly as the eval pipeline does
(`data.load_image`) and runs through `inference.SingleDispatchCascade`: the
real dynamic cascade, which computes only the segments up to the exit the
image takes, so the MACs reported are the MACs spent.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from adaptive_vision import backend as backend_lib
from adaptive_vision import data as data_lib
from adaptive_vision import models
from adaptive_vision.config import require
from adaptive_vision.inference import SingleDispatchCascade


def load_images(config, paths: Sequence[str]) -> list[dict]:
  """Every file decoded and preprocessed first (with the views the model of
  `config` reads), so a bad one stops the run before any prediction is
  printed (ValueError naming it)."""
  views = models.data_views(config.data.image_size, config.model)
  return [data_lib.load_image(config.data, p, views) for p in paths]


def _batch_of_one(example: dict) -> dict:
  return {k: tuple(x[None] for x in v) if k == "views" else v[None] for k, v in example.items()}


def predict_files(config, variables, paths: Sequence[str], thresholds, *,
                  criterion: str = "entropy", class_names: Optional[Sequence[str]] = None,
                  examples: Optional[Sequence[dict]] = None) -> Iterator[dict]:
  """Yields per image: path, class_index, class_name, exit (0 = cheapest),
  num_exits, macs (the cumulative MACs of the exit taken) and logits (of
  that exit). `examples`: the images already loaded (`load_images`)."""
  examples = load_images(config, paths) if examples is None else examples
  # One program per image on the default device: the serving backend.
  be = backend_lib.choose(require(config, "backend"), None, "serve")
  model = models.build(config.model, layers=be.layers)
  exit_macs = models.exit_macs(config.model)
  cascade = SingleDispatchCascade(model, variables, thresholds, criterion, backend=be)
  for path, example in zip(paths, examples):
    out = cascade.predict(models.inputs_from_batch(config.model, _batch_of_one(example)))
    c, e = int(out["predictions"][0]), int(out["exit_index"][0])
    yield {"path": str(path), "class_index": c,
           "class_name": class_names[c] if class_names and c < len(class_names) else str(c),
           "exit": e, "num_exits": len(exit_macs), "macs": float(exit_macs[e]),
           "logits": np.asarray(out["logits"][0])}


def format_row(row: dict) -> str:
  """`path<TAB>class<TAB>exit k of E<TAB>M.MM MMACs`."""
  return (f"{row['path']}\t{row['class_name']}\texit {row['exit']} of {row['num_exits']}\t"
          f"{row['macs'] / 1e6:.2f} MMACs")
