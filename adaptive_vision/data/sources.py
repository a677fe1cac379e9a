"""Random-access example sources: tfds (array_record), image folders, synthetic.

Every source has `__len__` and `__getitem__(i) -> {'image': uint8 [H, W, 3],
'label': int}` (grain RandomAccessDataSource compatible) and pickles cheaply, so
grain worker processes can use it.

Splits: 'train' and 'val' both come from `data.train_split`; `val_size` examples
are held out by a fixed permutation (seed `split_seed`) and removed from 'train'.
'test' is `data.test_split`, untouched. `train_size` / `test_size` keep only the
first N examples (after the holdout).

Image folders (`source='folder'`) are decoded once into a cache:
`<cache_dir>/folder/<name>-<split>-<hash of source path and options>/` holding
`images-<fp>.npy` (uint8 [N, H, W, 3], opened with mmap), `labels-<fp>.npy` and
`meta.json` (class names, fingerprint `fp` of the source files' paths, sizes and
mtimes, skipped files). A changed source gets a new fingerprint and is converted
again; meta.json is replaced last and atomically, so readers never see a
half-written cache. Rows are stored in a fixed shuffled order (seed 0) so that
"the first N examples" (train_size / test_size) cover all classes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from adaptive_vision.cache_dir import cache_dir
from adaptive_vision.config import require
from adaptive_vision.data import augment as augment_lib

log = logging.getLogger(__name__)

SOURCES = ("tfds", "folder", "synthetic")
SPLITS = ("train", "val", "test")
_CACHE_FORMAT = 1
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_FOLDER_LAYOUT = ("<split>/<class>/<image> (a directory or a .tar/.tar.gz of it),"
                  " or a directory holding <split>.tar.gz files")

# ----------------------------------------------------------------------------- config


def data_field(data_cfg, key: str):
  """`data_cfg[key]` (None included); a missing key is a one-line error naming
  data.<key> (the defaults live in configs/common.py `base_config()`)."""
  return require(data_cfg, key, "data")


def cache_root(data_cfg) -> Path:
  """data.cache_dir, else $ADAPTIVE_VISION_CACHE, else ~/.cache/adaptive_vision."""
  root = data_field(data_cfg, "cache_dir")
  return Path(root).expanduser() if root else cache_dir()


def validate_config(data_cfg) -> None:
  """Checks enum-like fields up front so mistakes fail in one clear line."""
  source = data_field(data_cfg, "source")
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r} is unknown; use one of {SOURCES}")
  bad = data_field(data_cfg, "on_bad_image")
  if bad not in ("error", "skip"):
    raise ValueError(f"data.on_bad_image={bad!r} is unknown; use 'error' or 'skip'")
  aug = data_field(data_cfg, "augment")
  if aug not in augment_lib.AUGMENTS:
    raise ValueError(f"data.augment={aug!r} is unknown; use one of {augment_lib.AUGMENTS}")
  image_size = data_field(data_cfg, "image_size")
  if image_size is None or int(image_size) <= 0:
    raise ValueError(f"data.image_size={image_size!r} must be a positive int")
  augment_lib.normalization_stats(data_field(data_cfg, "name"),
                                  data_field(data_cfg, "normalize"))
  for key in ("val_size", "train_size", "test_size", "num_workers"):
    value = data_field(data_cfg, key)
    if value is not None and int(value) < 0:
      raise ValueError(f"data.{key}={value} must be >= 0")


# ----------------------------------------------------------------------------- sources


def _check_labels(labels: np.ndarray, num_classes, where: str, folders=None) -> None:
  """Every label in [0, num_classes), else a one-line error; `folders[k]` names
  where the files of label k are (class folders), so the message points at them."""
  if num_classes is None or len(labels) == 0:
    return
  outside = (labels < 0) | (labels >= num_classes)
  bad = int(np.count_nonzero(outside))
  if bad:
    needed = int(labels.max()) + 1
    named = ""
    if folders is not None:
      ks, counts = np.unique(labels[outside], return_counts=True)
      shown = [f"{folders[k]} ({n} files)" for k, n in zip(ks[:3], counts[:3])]
      named = f' (in {", ".join(shown)}{", ..." if len(ks) > 3 else ""})'
    raise ValueError(
        f"{bad} of {len(labels)} labels in {where} are outside [0, {num_classes}){named}:"
        f" set data.num_classes={needed} (or remove the extra classes)")


class ArraySource:
  """uint8 images [N, H, W, 3] in a .npy file (memory-mapped lazily) + int labels."""

  def __init__(self, images_path, labels: np.ndarray, class_names=None):
    self.images_path = str(images_path)
    self.labels = np.asarray(labels, np.int64)
    self.class_names = list(class_names) if class_names is not None else None
    self._images = None

  @property
  def images(self) -> np.ndarray:
    if self._images is None:
      self._images = np.load(self.images_path, mmap_mode="r")
    return self._images

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i) -> dict[str, Any]:
    return {"image": np.asarray(self.images[i]), "label": int(self.labels[i])}

  def read_many(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [B, H, W, 3], int32 labels [B]) of items `indices`, in
    one gather from the mapped array."""
    idx = np.asarray(indices, np.int64)
    return augment_lib.to_rgb_batch(np.asarray(self.images[idx])), self.labels[idx].astype(np.int32)

  def __getstate__(self):
    # Pickle the path, not the (possibly huge) mapped array.
    state = dict(self.__dict__)
    state["_images"] = None
    return state


class SyntheticSource:
  """Class-conditional images a small ViT learns in about a minute on CPU.

  Class k has a random low-frequency color template (a 4x4 grid of colors upsampled
  bilinearly, same for every split); each example is its template rolled by a
  random shift of up to size/8 pixels, plus a random brightness offset and pixel
  noise. Labels and per-example randomness come from `seed`, so splits made with
  different seeds share the classes but not the examples.
  """

  TEMPLATE_SEED = 20240607
  GRID = 4

  def __init__(self, num_examples: int, image_size: int, num_classes: int, seed: int):
    self.n = int(num_examples)
    self.size = int(image_size)
    self.num_classes = int(num_classes)
    self.seed = int(seed)
    self.labels = np.random.default_rng([self.seed, 0]).integers(
        0, self.num_classes, size=self.n)
    self.grids = np.random.default_rng(self.TEMPLATE_SEED).integers(
        0, 256, size=(self.num_classes, self.GRID, self.GRID, 3), dtype=np.uint8)
    self.class_names = [f"class_{k}" for k in range(self.num_classes)]
    # Upsampled templates are memoized when they all fit in 64 MB.
    self._memo = {} if self.num_classes * self.size**2 * 12 <= 64 << 20 else None

  def template(self, label: int) -> np.ndarray:
    if self._memo is not None and label in self._memo:
      return self._memo[label]
    img = Image.fromarray(self.grids[label]).resize((self.size, self.size), Image.BILINEAR)
    t = np.asarray(img, np.float32)
    if self._memo is not None:
      self._memo[label] = t
    return t

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < self.n:
      raise IndexError(i)
    label = int(self.labels[i])
    rng = np.random.default_rng([self.seed, 1, i])
    shift = max(1, self.size // 8)
    dy, dx = rng.integers(-shift, shift + 1, size=2)
    x = np.roll(self.template(label), (int(dy), int(dx)), axis=(0, 1))
    x = x + rng.normal(0.0, 12.0) + rng.normal(0.0, 20.0, size=x.shape)
    return {"image": np.clip(x, 0, 255).astype(np.uint8), "label": label}


class TfdsSource:
  """Wraps a tfds array_record data source; reading needs no TensorFlow."""

  def __init__(self, tfds_source, num_classes=None, where=""):
    self.ds = tfds_source
    self.num_classes = num_classes
    self.where = where

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i) -> dict[str, Any]:
    ex = self.ds[int(i)]
    label = int(ex["label"])
    if self.num_classes is not None and not 0 <= label < self.num_classes:
      raise ValueError(
          f"label {label} of example {i} in {self.where} is outside"
          f" [0, {self.num_classes}): raise data.num_classes")
    return {"image": augment_lib.to_rgb(ex["image"]), "label": label}


def read_batch(src, indices) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [B, H, W, 3], int32 labels [B]) of the items `indices` of
  `src`: one gather where the source keeps arrays (read_many), else item by item."""
  many = getattr(src, "read_many", None)
  if many is not None:
    return many(indices)
  items = [src[int(i)] for i in indices]
  return (np.stack([augment_lib.to_rgb(it["image"]) for it in items]),
          np.asarray([it["label"] for it in items], np.int32))


class SubsetSource:
  """A view of `base` restricted to `indices` (holdout / size limits)."""

  def __init__(self, base, indices: np.ndarray):
    self.base = base
    self.indices = np.asarray(indices, np.int64)
    self.class_names = getattr(base, "class_names", None)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i) -> dict[str, Any]:
    return self.base[int(self.indices[i])]

  def read_many(self, indices) -> tuple[np.ndarray, np.ndarray]:
    return read_batch(self.base, self.indices[np.asarray(indices, np.int64)])

  @property
  def labels(self) -> np.ndarray | None:
    labels = getattr(self.base, "labels", None)
    return None if labels is None else labels[self.indices]


# ----------------------------------------------------------------------------- tfds


class DatasetNotPreparedError(FileNotFoundError):
  """A tfds dataset is not prepared in the data dir (we never download)."""


def _tfds_source(data_cfg, split_name: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = data_field(data_cfg, "name")
  base = str(name).split("/")[0].split(":")[0]
  try:
    tfds.builder_cls(base)
  except Exception as e:  # DatasetNotFoundError (a ValueError) or similar
    raise ValueError(
        f"unknown tfds dataset {name!r}; check the name, or use data.source='folder'"
        " with data.path pointing at a local image folder") from e
  data_dir = data_field(data_cfg, "path")
  builder = tfds.builder(name, data_dir=data_dir)
  # is_prepared() only looks at the local dataset_info.json; tfds.data_source with
  # download=False would otherwise try GCS and retry for minutes on a closed network.
  if not builder.is_prepared():
    root = data_dir or tfds.core.constants.DATA_DIR
    raise DatasetNotPreparedError(
        f"dataset {name!r} is not prepared in {root}; prepare it with `tfds build"
        f" {base} --data_dir={root}` on a machine with network, or point"
        " data.source='folder' and data.path at an image folder such as"
        " ../shared/data/cifar10")
  splits = dict(builder.info.splits or {})
  split_base = split_name.split("[")[0]
  if splits and split_base not in splits:
    raise ValueError(f"tfds dataset {name!r} has no split {split_base!r}; available:"
                     f" {sorted(splits)} (set data.train_split / data.test_split)")
  num_classes = data_field(data_cfg, "num_classes")
  label_feature = builder.info.features["label"] if "label" in builder.info.features else None
  ds_classes = getattr(label_feature, "num_classes", None)
  if num_classes is not None and ds_classes and ds_classes > num_classes:
    raise ValueError(
        f"tfds dataset {name!r} has {ds_classes} classes, so labels up to"
        f" {ds_classes - 1} fall outside [0, {num_classes}): set"
        f" data.num_classes={ds_classes}")
  return TfdsSource(builder.as_data_source(split=split_name), num_classes,
                    where=f"{name}:{split_name}")


# ----------------------------------------------------------------------------- folders


def _find_split_input(path, split: str):
  """Returns ('dir', split_dir) or ('tar', tar_path) for `split` under data.path."""
  if path is None:
    raise ValueError("data.source='folder' needs data.path: " + _FOLDER_LAYOUT)
  p = Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"data.path {p} does not exist; expected {_FOLDER_LAYOUT}")
  if p.is_file():
    if p.name.endswith(_TAR_SUFFIXES) or tarfile.is_tarfile(p):
      return "tar", p.resolve()
    raise FileNotFoundError(f"data.path {p} is a file but not a tar archive; expected"
                            f" {_FOLDER_LAYOUT}")
  if (p / split).is_dir():
    return "dir", (p / split).resolve()
  for suffix in _TAR_SUFFIXES:
    if (p / f"{split}{suffix}").is_file():
      return "tar", (p / f"{split}{suffix}").resolve()
  raise FileNotFoundError(
      f"split {split!r} not found under {p}: expected {p / split}/<class>/<image> or"
      f" {p / split}.tar.gz")


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _list_dir(split_dir: Path):
  """Sorted (relative path, class name) pairs of <split_dir>/<class>/<file>."""
  classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and _visible(d.name))
  if not classes:
    raise FileNotFoundError(f"no class folders in {split_dir}; expected {_FOLDER_LAYOUT}")
  entries = []
  for c in classes:
    for f in sorted(os.scandir(split_dir / c), key=lambda e: e.name):
      if f.is_file() and _visible(f.name):
        entries.append((f"{c}/{f.name}", c))
  return entries, classes


def _tar_member_class(name: str, split: str, per_split_tar: bool):
  """Class of a tar member '<...>/<split>/<class>/<file>' (None if not in `split`)."""
  parts = [q for q in name.split("/") if q not in ("", ".")]
  if len(parts) >= 3 and parts[-3] == split:
    return parts[-2]
  if per_split_tar and len(parts) == 2:  # <split>.tar.gz holding <class>/<file>
    return parts[0]
  return None


def _list_tar(tar_path: Path, split: str, per_split_tar: bool):
  """One streaming pass over the archive (gzip cannot seek cheaply)."""
  entries = []
  with tarfile.open(tar_path, "r|*") as tf:
    for m in tf:
      if not m.isfile() or not _visible(os.path.basename(m.name)):
        continue
      c = _tar_member_class(m.name, split, per_split_tar)
      if c is not None and _visible(c):
        entries.append((m.name, c))
  if not entries:
    raise FileNotFoundError(
        f"no images of split {split!r} in {tar_path}; expected members named"
        f" {split}/<class>/<image>")
  entries.sort(key=lambda e: (e[1], e[0]))
  return entries, sorted({c for _, c in entries})


def _fingerprint_dir(split_dir: Path, entries) -> str:
  h = hashlib.sha1(str(split_dir).encode())
  for rel, _ in entries:
    st = os.stat(split_dir / rel)
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def _fingerprint_file(path: Path) -> str:
  st = os.stat(path)
  return hashlib.sha1(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")


def image_files(paths: Sequence[str]) -> list[str]:
  """Image files named by `paths`: files as given, folders searched (sorted,
  recursively, hidden entries skipped) for files with an image suffix.

  One-line errors: a path that does not exist, a folder without images.
  """
  out = []
  for p in paths:
    path = Path(p)
    if path.is_file():
      out.append(str(path))
    elif path.is_dir():
      found = sorted(
          str(Path(root) / f) for root, dirs, files in os.walk(path)
          for f in files if _visible(f) and not any(part.startswith(".") for part in
                                                    Path(root).relative_to(path).parts)
          and f.lower().endswith(IMAGE_SUFFIXES))
      if not found:
        raise ValueError(f"folder {p} holds no images (looked for "
                         f'{", ".join(IMAGE_SUFFIXES)} files, recursively)')
      out.extend(found)
    else:
      raise ValueError(f"{p} does not exist")
  return out


def decode_image(data, size: int | None) -> np.ndarray:
  """A path or bytes decoded as the folder source decodes its files."""
  return _decode_image(data, size)


def _decode_image(data, size: int | None) -> np.ndarray:
  """Decodes a path or bytes to uint8 RGB [H, W, 3]; resizes to size x size if given."""
  src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  with Image.open(src) as im:
    if size is not None:
      im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when possible
    im = im.convert("RGB")
    if size is not None and im.size != (size, size):
      # Whole image to size x size (aspect not kept), like downsampled ImageNet.
      im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def _decode_chunk(items, size):
  out = []
  for idx, name, data in items:
    try:
      out.append((idx, name, _decode_image(data, size), None))
    except Exception as e:  # pylint: disable=broad-except
      out.append((idx, name, None, e))
  return out


def _chunks(it, n):
  chunk = []
  for x in it:
    chunk.append(x)
    if len(chunk) == n:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _npy_tmp(path: Path) -> Path:
  return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _safe(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:60] or "data"


class _Converter:
  """Decodes a folder/tar split into the cache (see module docstring)."""

  CHUNK = 256

  def __init__(self, kind, location, split, entries, classes, size, on_bad_image,
               display):
    self.kind, self.location, self.split = kind, location, split
    self.entries, self.classes = entries, classes
    self.size, self.on_bad_image, self.display = size, on_bad_image, display

  def _items(self) -> Iterator[tuple[int, str, Any]]:
    """(entry index, display name, path or bytes), in the cheapest read order."""
    if self.kind == "dir":
      for i, (rel, _) in enumerate(self.entries):
        yield i, str(self.location / rel), str(self.location / rel)
      return
    index = {name: i for i, (name, _) in enumerate(self.entries)}
    with tarfile.open(self.location, "r|*") as tf:
      for m in tf:
        i = index.get(m.name) if m.isfile() else None
        if i is not None:
          yield i, f"{self.location}:{m.name}", tf.extractfile(m).read()

  def run(self, out_dir: Path, fp: str):
    n = len(self.entries)
    class_index = {c: k for k, c in enumerate(self.classes)}
    entry_labels = np.array([class_index[c] for _, c in self.entries], np.int64)
    # Row r of the cache holds entry order[r]: a fixed shuffle, so first-N is balanced.
    order = np.random.default_rng(0).permutation(n)
    row_of = np.empty(n, np.int64)
    row_of[order] = np.arange(n)
    images_path = out_dir / f"images-{fp}.npy"
    tmp = _npy_tmp(images_path)
    images = rows_out = None
    first = None  # (name, shape) of the first decoded image
    ok = np.zeros(n, bool)
    skipped = []
    workers = max(1, min(4, os.cpu_count() or 1))
    try:
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = []
        chunks = _chunks(self._items(), self.CHUNK)
        while True:
          # Keep a bounded number of chunks in flight (memory stays small for tars).
          while len(pending) < 2 * workers:
            chunk = next(chunks, None)
            if chunk is None:
              break
            pending.append(pool.submit(_decode_chunk, chunk, self.size))
          if not pending:
            break
          for idx, name, arr, err in pending.pop(0).result():
            if err is not None:
              if self.on_bad_image == "error":
                raise ValueError(
                    f"cannot decode image {name}: {err}; fix or remove the file, or"
                    " set data.on_bad_image='skip'")
              skipped.append(name)
              continue
            if first is None:
              first = (name, arr.shape)
              images = np.lib.format.open_memmap(
                  tmp, mode="w+", dtype=np.uint8, shape=(n,) + arr.shape)
              rows_out = images.view(np.ndarray)  # plain view: no memmap per-row overhead
            elif arr.shape != first[1]:
              raise ValueError(
                  f"image {name} is {arr.shape[1]}x{arr.shape[0]} but {first[0]} is"
                  f" {first[1][1]}x{first[1][0]}: set data.cache_image_size=<int> to"
                  " resize all images while caching")
            rows_out[row_of[idx]] = arr
            ok[idx] = True
      if images is None:
        raise ValueError(f"no decodable images in {self.display} (split {self.split!r})")
      keep = ok[order]  # per row
      labels = entry_labels[order][keep]
      if not keep.all():  # compact the rows of skipped files (rare path)
        tmp2 = _npy_tmp(images_path)
        compact = np.lib.format.open_memmap(
            tmp2, mode="w+", dtype=np.uint8, shape=(int(keep.sum()),) + first[1])
        rows = np.flatnonzero(keep)
        for s in range(0, len(rows), 4096):
          compact[s:s + 4096] = images[rows[s:s + 4096]]
        compact.flush()
        del compact, images, rows_out
        os.replace(tmp2, tmp)
      else:
        images.flush()
        del images, rows_out
      labels_path = out_dir / f"labels-{fp}.npy"
      ltmp = _npy_tmp(labels_path)
      with open(ltmp, "wb") as f:
        np.save(f, labels)
      os.replace(ltmp, labels_path)
      os.replace(tmp, images_path)
    finally:
      for t in out_dir.glob(f"*.tmp-{os.getpid()}-*"):
        t.unlink(missing_ok=True)
    if skipped:
      log.warning("skipped %d unreadable image(s) in %s: %s", len(skipped),
                  self.display, ", ".join(skipped))
    return images_path.name, labels_path.name, skipped


def _cache_dir_for(data_cfg, kind, location: Path, split: str) -> Path:
  size = data_field(data_cfg, "cache_image_size")
  key = hashlib.sha1(f"{kind}\0{location}\0{split}\0{size}\0{_CACHE_FORMAT}".encode())
  label = _safe(str(data_field(data_cfg, "name")))
  return cache_root(data_cfg) / "folder" / f"{label}-{_safe(split)}-{key.hexdigest()[:12]}"


def _read_meta(out_dir: Path):
  try:
    return json.loads((out_dir / "meta.json").read_text())
  except (OSError, ValueError):
    return None


def _folder_source(data_cfg, split: str) -> ArraySource:
  path = data_field(data_cfg, "path")
  kind, location = _find_split_input(path, split)
  # A single archive holding every split versus one archive per split.
  per_split_tar = kind == "tar" and not (Path(path).expanduser().is_file())
  size = data_field(data_cfg, "cache_image_size")
  size = None if size is None else int(size)
  on_bad = data_field(data_cfg, "on_bad_image")
  out_dir = _cache_dir_for(data_cfg, kind, location, split)
  display = f"{location}" if kind == "dir" else f"{location} ({split})"

  entries = classes = None
  if kind == "dir":
    entries, classes = _list_dir(location)
    fp = _fingerprint_dir(location, entries)
  else:
    fp = _fingerprint_file(location)
  meta = _read_meta(out_dir)
  if not (meta and meta.get("fingerprint") == fp and meta.get("format") == _CACHE_FORMAT
          and (out_dir / meta["images"]).exists() and (out_dir / meta["labels"]).exists()):
    if entries is None:
      entries, classes = _list_tar(location, split, per_split_tar)
    log.info("converting %d images of %s into %s", len(entries), display, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conv = _Converter(kind, location, split, entries, classes, size, on_bad, display)
    images_name, labels_name, skipped = conv.run(out_dir, fp)
    meta = {"format": _CACHE_FORMAT, "source": str(location), "split": split,
            "fingerprint": fp, "cache_image_size": size, "class_names": classes,
            "num_examples": len(entries) - len(skipped), "skipped": skipped,
            "images": images_name, "labels": labels_name}
    tmp = _npy_tmp(out_dir / "meta.json")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / "meta.json")  # commit point
    for stale in out_dir.glob("*.npy"):  # previous versions of a changed source
      if stale.name not in (images_name, labels_name):
        stale.unlink(missing_ok=True)
  elif meta.get("skipped") and on_bad == "error":
    raise ValueError(
        f"cached {display} was built with on_bad_image='skip' and lacks"
        f" {len(meta['skipped'])} unreadable file(s) (first: {meta['skipped'][0]}); fix"
        " them or set data.on_bad_image='skip'")
  labels = np.load(out_dir / meta["labels"])
  src = ArraySource(out_dir / meta["images"], labels, meta["class_names"])
  folders = [str(location / c) if kind == "dir" else f"{location} class folder {c!r}"
             for c in meta["class_names"]]
  _check_labels(labels, data_field(data_cfg, "num_classes"), display, folders)
  return src


def _check_class_consistency(data_cfg, split_src, split: str, train_split: str):
  """Folder splits map class names to indices independently; they must agree."""
  try:
    kind, location = _find_split_input(data_field(data_cfg, "path"), train_split)
  except (FileNotFoundError, ValueError):
    return
  meta = _read_meta(_cache_dir_for(data_cfg, kind, location, train_split))
  if meta and meta.get("class_names") and split_src.class_names != meta["class_names"]:
    raise ValueError(
        f"class folders of split {split!r} {split_src.class_names} differ from"
        f" those of {train_split!r} {meta['class_names']}: every split needs the same"
        " class folders so that label indices agree")


# ----------------------------------------------------------------------------- public


def _raw_split(data_cfg, which: str):
  """The full underlying split: which is 'train' (train_split) or 'test'."""
  source = data_field(data_cfg, "source")
  split_name = data_field(data_cfg, f"{which}_split")
  if source == "synthetic":
    n = data_field(data_cfg, "synthetic_train_size" if which == "train"
              else "synthetic_test_size")
    seed = int(data_field(data_cfg, "synthetic_seed"))
    num_classes = data_field(data_cfg, "num_classes")
    if num_classes is None:
      raise ValueError("data.source='synthetic' needs data.num_classes")
    # Different seeds for the two splits: same class templates, new examples.
    return SyntheticSource(n, data_field(data_cfg, "image_size"), num_classes,
                           seed=2 * seed + (0 if which == "train" else 1))
  if source == "folder":
    src = _folder_source(data_cfg, split_name)
    if which == "test":
      _check_class_consistency(data_cfg, src, split_name,
                               data_field(data_cfg, "train_split"))
    return src
  return _tfds_source(data_cfg, split_name)


def _limit(n: int, limit, field: str, available_desc: str) -> int:
  if limit is None:
    return n
  limit = int(limit)
  if limit > n:
    raise ValueError(f"data.{field}={limit} exceeds the {n} examples {available_desc};"
                     f" lower it or set it to None")
  return limit


def _train_val_indices(data_cfg, n: int):
  val_size = int(data_field(data_cfg, "val_size") or 0)
  if val_size >= n and val_size > 0:
    raise ValueError(f"data.val_size={val_size} must be smaller than the {n} examples"
                     " of the train split")
  perm = np.random.default_rng(int(data_field(data_cfg, "split_seed"))).permutation(n)
  return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def get_source(data_cfg, split: str):
  """Random-access source of uint8 examples for split 'train' | 'val' | 'test'.

  The holdout (`val_size`, `split_seed`) and size limits (`train_size`,
  `test_size`) are applied. Items: {'image': uint8 [H, W, 3], 'label': int}.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}")
  validate_config(data_cfg)
  if split == "test":
    base = _raw_split(data_cfg, "test")
    n = _limit(len(base), data_field(data_cfg, "test_size"), "test_size",
               "of the test split")
    return SubsetSource(base, np.arange(n))
  base = _raw_split(data_cfg, "train")
  train_idx, val_idx = _train_val_indices(data_cfg, len(base))
  if split == "val":
    if len(val_idx) == 0:
      raise ValueError("split 'val' is empty: set data.val_size > 0 to hold out"
                       " validation examples from the train split")
    return SubsetSource(base, val_idx)
  n = _limit(len(train_idx), data_field(data_cfg, "train_size"), "train_size",
             "left in the train split after holding out data.val_size")
  return SubsetSource(base, train_idx[:n])


def num_examples(data_cfg, split: str) -> int:
  """Number of examples of a split after holdout and size limits (0 for an empty val)."""
  if split == "val" and not data_field(data_cfg, "val_size"):
    return 0
  return len(get_source(data_cfg, split))


def dataset_info(data_cfg) -> dict[str, int]:
  """dict(num_classes, train_size, val_size, test_size) after holdout and limits."""
  train = get_source(data_cfg, "train")
  val_size = int(data_field(data_cfg, "val_size") or 0)
  num_classes = data_field(data_cfg, "num_classes")
  if num_classes is None and train.class_names is not None:
    num_classes = len(train.class_names)
  return dict(num_classes=num_classes, train_size=len(train), val_size=val_size,
              test_size=num_examples(data_cfg, "test"))


def class_names(data_cfg) -> Sequence[str] | None:
  """Class names of folder / synthetic data (None for tfds)."""
  return get_source(data_cfg, "train").class_names
