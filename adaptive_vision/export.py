"""A trained model's variables in one portable file, and the loader that checks them.

The file is a NumPy `.npz` (read with `np.load(path)`, no pickle, no JAX):

* `params/<module>/.../<name>` and `batch_stats/<module>/.../<name>`: the
  arrays, keyed by their '/'-joined paths in the flax variable tree;
* `meta.json`: a 0-d string array holding JSON: `format`, `version`, the
  model config (`model`), the shape of every array (`signature`),
  cumulative `exit_macs`, the eval `preprocessing`, `class_names`, the
  `calibration` (entropy thresholds per MACs budget, chosen on the
  validation split, never test) and `source` (workdir, checkpoint step).

`export_variables(config, variables, out, budgets)` writes one (the
thresholds calibrated on the validation split by `eval.predict.evaluate`).
`load_params(path, config)` returns the variables only if they belong to the
model `config` describes (same parameter shapes, same model fields, same
eval preprocessing); anything else is one ValueError line naming the first
difference. The file describes itself: `training_config(meta)` is the whole
config it was trained with, so `launch.predict` and `launch.evaluate --params`
need no --config.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

FORMAT = "adaptive_vision.params"
VERSION = 1
META_KEY = "meta.json"
COLLECTIONS = ("params", "batch_stats")
# Model fields that change how the function is computed or trained, not what it
# is: a file exported under one value loads under another.
_NOT_THE_FUNCTION = ("dtype", "dropout", "stochastic_depth", "exit_dropout", "head_zero_init",
                     "stop_gradient_reuse", "reuse_init")


# ----------------------------------------------------------------------------
# Pure pieces


def _leaves(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'params/a/b/kernel': leaf, ...} of the collections that are present."""
  out = {}

  def walk(prefix, node):
    if isinstance(node, Mapping):
      for k in sorted(node):
        walk(f"{prefix}/{k}", node[k])
    else:
      out[prefix] = node
  for c in COLLECTIONS:
    if tree.get(c):
      walk(c, tree[c])
  return out


def flatten(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in _leaves(variables).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def signature(variables: Mapping[str, Any]) -> dict[str, list[int]]:
  return {k: list(np.shape(v)) for k, v in _leaves(variables).items()}


def expected_signature(config) -> dict[str, list[int]]:
  """Shapes of the variables the model of `config` has (no arrays made)."""
  import jax
  from adaptive_vision import models
  model = models.build(config.model)
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                             models.dummy_inputs(config.model), train=False))
  return {k: list(v.shape) for k, v in _leaves(shapes).items()}


def model_fields(model_cfg) -> dict:
  """The model config as JSON values (tuples become lists)."""
  return json.loads(model_cfg.to_json_best_effort()) if hasattr(
      model_cfg, "to_json_best_effort") else json.loads(json.dumps(dict(model_cfg)))


def preprocessing(config) -> dict:
  """What the eval pipeline does to an image before the model of `config` sees it."""
  from adaptive_vision import models
  from adaptive_vision.data import augment, sources
  data_cfg = config.data
  get = lambda k: sources.data_field(data_cfg, k)
  stats = augment.normalization_stats(get("name"), get("normalize"))
  resolutions = models.data_views(get("image_size"), config.model)
  return {"image_size": int(get("image_size")),
          "resolutions": None if resolutions is None else [int(r) for r in resolutions],
          "eval_crop": "center" if get("augment") == "inception" else "resize",
          "mean": None if stats is None else [round(float(x), 6) for x in stats[0]],
          "std": None if stats is None else [round(float(x), 6) for x in stats[1]],
          "cache_image_size": get("cache_image_size")}


def calibration(val_exit_logits, val_labels, exit_macs, budgets: Sequence[float], *,
                reference_macs: float, reference: str,
                criterion: str = "entropy") -> dict:
  """Thresholds per MACs budget, chosen on VALIDATION logits (never test).

  Budget b means mean MACs <= b * reference_macs on the validation split,
  at the best validation accuracy (`early_exit.calibrate`). A budget no
  thresholds meet is kept with its `error`.
  """
  from adaptive_vision import early_exit
  logits = np.asarray(val_exit_logits, np.float32)
  labels = np.asarray(val_labels)
  points = []
  for b in budgets:
    point: dict[str, Any] = {"budget": float(b)}
    try:
      t = early_exit.calibrate(logits, labels, exit_macs, criterion=criterion,
                               max_mean_macs=float(b) * reference_macs)
    except ValueError as e:
      point["error"] = str(e)
    else:
      res = early_exit.evaluate_policy(logits, labels, t, exit_macs, criterion)
      point.update(thresholds=[float(x) for x in t], val_accuracy=res["accuracy"],
                   val_mean_macs=res["mean_macs"],
                   val_exit_fractions=[float(x) for x in res["exit_fractions"]])
    points.append(point)
  return {"split": "val", "criterion": criterion, "num_examples": int(labels.shape[0]),
          "reference": reference, "reference_macs": float(reference_macs),
          "val_exit_accuracy": [float(a) for a in early_exit.per_exit_accuracy(logits, labels)],
          "budgets": points}


def _first_differences(a: Mapping, b: Mapping, limit: int = 3) -> list[str]:
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:limit]


def _flat_fields(x, prefix="model") -> dict:
  if isinstance(x, Mapping):
    out = {}
    for k, v in x.items():
      out.update(_flat_fields(v, f"{prefix}.{k}"))
    return out
  if isinstance(x, (list, tuple)) and any(isinstance(v, Mapping) for v in x):
    out = {}
    for i, v in enumerate(x):
      out.update(_flat_fields(v, f"{prefix}[{i}]"))
    return out
  return {prefix: x}


def check_matches(meta: Mapping, variables: Mapping, config, path: str = "the file") -> None:
  """Raises one ValueError line when the file is not a model of `config`."""
  hint = "pass the --config the file was exported with (its meta.json names the model)"
  want = {k: v for k, v in _flat_fields(model_fields(config.model)).items()
          if k.rsplit(".", 1)[-1] not in _NOT_THE_FUNCTION}
  got = {k: v for k, v in _flat_fields(meta.get("model", {})).items()
         if k.rsplit(".", 1)[-1] not in _NOT_THE_FUNCTION}
  shapes_want, shapes_got = expected_signature(config), signature(variables)
  if shapes_want != shapes_got or want != got:
    if want != got:
      k = "model.name" if want.get("model.name") != got.get("model.name") else (
          _first_differences(want, got, 1)[0])
      what = f"{k} is {got.get(k)!r} in the file but {want.get(k)!r} in --config"
    else:
      k = _first_differences(shapes_want, shapes_got, 1)[0]
      what = (f"parameter {k} has shape {shapes_got.get(k)} in the file but "
              f"{shapes_want.get(k)} in --config's model")
    raise ValueError(f"{path} holds the parameters of another model ({what}); {hint}")
  if meta.get("preprocessing") and meta["preprocessing"] != preprocessing(config):
    a, b = meta["preprocessing"], preprocessing(config)
    k = _first_differences(a, b, 1)[0]
    raise ValueError(f"{path} was exported with another eval preprocessing ({k}: "
                     f"{a.get(k)!r} in the file, {b.get(k)!r} from --config's data); {hint}")


# ----------------------------------------------------------------------------
# Files


def save(path: str, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> int:
  """Writes the file atomically (a reader never sees half of it); returns its size."""
  arrays = flatten(variables)
  meta = dict(meta, format=FORMAT, version=VERSION, signature=signature(variables))
  arrays[META_KEY] = np.asarray(json.dumps(meta, sort_keys=True))
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:  # a file object: np.savez would add '.npz' to a name
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return os.path.getsize(path)


def is_params_file(path) -> bool:
  """Whether `path` names a parameters file (as opposed to a run's workdir)."""
  return str(path).endswith(".npz") and not os.path.isdir(path)


def read(path: str) -> tuple[dict, dict]:
  """(variables, meta) of a file written by `save`; one-line ValueError otherwise."""
  if not os.path.exists(path):
    raise ValueError(f"params file {path} does not exist; write one with python -m "
                     f"launch.export --config ... --workdir RUN --out {path}")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile):
    raise ValueError(f"{path} is not a parameters file of launch.export (not an .npz "
                     "archive)") from None
  if META_KEY not in arrays:
    raise ValueError(f"{path} is not a parameters file of launch.export (no {META_KEY})")
  meta = json.loads(str(arrays.pop(META_KEY)))
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a parameters file of launch.export "
                     f"(format {meta.get('format')!r})")
  if int(meta.get("version", 0)) > VERSION:
    raise ValueError(f"{path} has format version {meta['version']}; this library reads "
                     f"up to {VERSION}: update adaptive_vision")
  variables = unflatten(arrays)
  if signature(variables) != meta.get("signature"):
    raise ValueError(f"{path} is damaged: its arrays do not match its meta.json signature")
  return variables, meta


def load_params(path: str, config) -> dict:
  """The variables ({'params': ..., 'batch_stats': ...}) in `path`, checked
  against the model and eval preprocessing of `config`."""
  variables, meta = read(path)
  check_matches(meta, variables, config, path)
  return variables


def load(path: str, config) -> tuple[dict, dict]:
  """`load_params` and the file's meta.json."""
  variables, meta = read(path)
  check_matches(meta, variables, config, path)
  return variables, meta


def export_variables(config, variables: Mapping[str, Any], out: str, budgets: Sequence[float],
                     *, reference_model=None, source: Optional[Mapping] = None,
                     mesh=None, criterion: str = "entropy") -> dict:
  """Writes the parameters file `out` of `variables`, trained with `config`.

  For each budget it stores the `criterion`'s ('entropy', the papers' rule, or
  'max_prob') thresholds calibrated on the
  validation split (held out of training; never test) for mean MACs <=
  budget x the reference MACs: the model's last exit, or `reference_model`'s
  (a model config, e.g. the ViT a RAViT is compared with). `source`: where
  the variables came from (e.g. workdir and step; with a 'config', the
  training config, else `config`). Returns the meta written,
  with the file's size.
  """
  from adaptive_vision import data as data_lib
  from adaptive_vision import models
  from adaptive_vision.eval import predict
  check_matches({"model": model_fields(config.model)}, variables, config,
                "the variables to export")
  exit_macs = models.exit_macs(config.model)
  if reference_model is not None:
    reference_macs = models.exit_macs(reference_model)[-1]
    reference = f"baseline {reference_model.name}"
  else:
    reference_macs, reference = exit_macs[-1], "the last exit"
  logits, labels = predict.evaluate(config, variables, mesh=mesh, splits=("val",))["val"]
  try:
    class_names = data_lib.class_names(config.data)
  except (ValueError, FileNotFoundError):
    class_names = None
  meta = {
      "model": model_fields(config.model),
      "exit_macs": [float(m) for m in exit_macs],
      "preprocessing": preprocessing(config),
      "class_names": list(class_names) if class_names else None,
      "calibration": calibration(logits, labels, exit_macs, [float(b) for b in budgets],
                                 reference_macs=reference_macs, reference=reference,
                                 criterion=criterion),
      # A source that names its training config (a re-calibrated file) keeps it.
      "source": {"config": json.loads(config.to_json_best_effort()), **(source or {})},
  }
  size = save(out, variables, meta)
  return dict(meta, size=size)


def training_config(meta: Mapping) -> dict:
  """The config the file's model was trained with (JSON values), as stored by
  `export_variables`; fields a newer library added are missing from older
  files, so a caller fills them from its defaults."""
  config = (meta.get("source") or {}).get("config")
  if not config:
    raise ValueError("the parameters file holds no training config; give --config")
  return config


def thresholds_for(meta: Mapping, num_exits: int, *, budget: Optional[float] = None,
                   threshold: Optional[float] = None, path: str = "the file"
                   ) -> tuple[list[float], str, str]:
  """(thresholds, criterion, what they are) for `launch.predict`.

  `threshold`: one shared entropy threshold for every early exit; `budget`:
  the thresholds calibrated for that MACs budget (stored in the file);
  neither: the first calibrated budget of the file (none are needed for a
  one-exit model).
  """
  if budget is not None and threshold is not None:
    raise ValueError("give --budget or --threshold, not both")
  if threshold is not None:
    return [float(threshold)] * (num_exits - 1), "entropy", (
        f"shared entropy threshold {threshold:g}")
  cal = meta.get("calibration") or {}
  points = cal.get("budgets", [])
  ref = f"{cal.get('reference', 'the reference')}'s MACs"
  if budget is None:
    if num_exits == 1:
      return [], "entropy", "one exit: no thresholds"
    usable = [p for p in points if "thresholds" in p]
    if not usable:
      raise ValueError(f"{path} holds no calibrated thresholds; give --threshold T")
    budget = usable[0]["budget"]
  match = [p for p in points if abs(p["budget"] - budget) < 1e-9]
  if not match:
    have = [p["budget"] for p in points]
    raise ValueError(f"{path} holds no thresholds for --budget {budget:g} (calibrated: "
                     f"{have}); export again with --budgets {budget:g} or give --threshold T")
  if "error" in match[0]:
    raise ValueError(f"--budget {budget:g}: {match[0]['error']} (budgets are fractions of "
                     f"{ref}, calibrated on the validation split)")
  p = match[0]
  return list(p["thresholds"]), cal.get("criterion", "entropy"), (
      f"--budget {budget:g}: thresholds calibrated on {cal.get('num_examples')} validation "
      f"images for mean MACs <= {budget:g} x {ref} (val accuracy "
      f"{100 * p['val_accuracy']:.2f}%, {p['val_mean_macs'] / 1e6:.2f} MMACs)")
