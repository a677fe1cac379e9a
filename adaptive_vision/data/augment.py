"""Per-example preprocessing: augmentation, resizing, multi-resolution views, normalization.

Everything here is NumPy + Pillow, so the grain pipeline can run it in threads or
worker processes; one example at a time, or (CIFAR augmentation) whole training
batches with the same result. Random choices come only from the
`np.random.Generator` that grain's `random_map` derives from (seed, example position),
which makes augmentation reproducible and independent of the number of workers.

Pixel pipeline: uint8 image -> augment / resize (uint8, Pillow antialiasing) ->
float32 in [0, 255] -> views (area averaging) -> normalize -> float32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

AUGMENTS = ("cifar", "inception", "none")

# Per-channel mean / std on the [0, 1] pixel scale.
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMALIZATION_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet2012": _IMAGENET_STATS,
    "imagenet": _IMAGENET_STATS,
    "tiny_imagenet": _IMAGENET_STATS,
    "imagenette": _IMAGENET_STATS,
}
_DEFAULT_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

INCEPTION_CROP_FRACTION = 0.875  # eval: resize shorter side to size / 0.875, center crop


def normalization_stats(name: str | None, normalize: Any):
  """Returns (mean, std) float32 arrays on the [0, 1] scale, or None for 'none'.

  normalize: 'auto' (constants picked by dataset name; the base name is used, so
  'cifar10:3.0.2' and 'imagenet2012/subset' work), 'none', or explicit (mean, std).
  """
  if normalize is None or (isinstance(normalize, str) and normalize == "none"):
    return None
  if isinstance(normalize, str):
    if normalize != "auto":
      raise ValueError(
          f"data.normalize={normalize!r} is not understood; use 'auto', 'none' or"
          " a (mean, std) pair of per-channel tuples on the [0, 1] scale")
    base = (name or "").split("/")[0].split(":")[0].lower()
    mean, std = NORMALIZATION_STATS.get(base, _DEFAULT_STATS)
  else:
    try:
      mean, std = normalize
      mean = np.broadcast_to(np.asarray(mean, np.float32), (3,))
      std = np.broadcast_to(np.asarray(std, np.float32), (3,))
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"data.normalize={normalize!r} must be (mean, std) with 1 or 3 values"
          " each, on the [0, 1] pixel scale") from e
    if np.any(mean > 1.0) or np.any(std > 1.0) or np.any(std <= 0):
      raise ValueError(
          f"data.normalize={normalize!r}: give mean/std on the [0, 1] pixel scale"
          " (e.g. ((0.5,)*3, (0.5,)*3)) with std > 0, not on the [0, 255] scale")
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def validate_resolutions(resolutions, image_size: int):
  """Returns resolutions as a tuple of ints (or None); raises a one-line ValueError."""
  if resolutions is None:
    return None
  res = tuple(int(r) for r in resolutions)
  if not res or any(r <= 0 for r in res):
    raise ValueError(
        f"views={resolutions!r} must be a non-empty tuple of positive"
        " ints, or None for single-resolution batches")
  if any(b <= a for a, b in zip(res, res[1:])):
    raise ValueError(
        f"views={res} must be strictly increasing (lowest first), e.g."
        f" {tuple(sorted(set(res)))}")
  if res[-1] != int(image_size):
    raise ValueError(
        f"views={res} must end with data.image_size={image_size}, the size"
        f" the augmented image is cropped at: make the largest model input"
        f" {image_size} or set data.image_size to {res[-1]}")
  return res


def to_rgb(image: np.ndarray) -> np.ndarray:
  """[H, W], [H, W, 1] or [H, W, 4] -> uint8 [H, W, 3] (grayscale is tiled)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[..., :3]
  if image.dtype != np.uint8:
    image = np.clip(image, 0, 255).astype(np.uint8)
  return image


def to_rgb_batch(images: np.ndarray) -> np.ndarray:
  """to_rgb of every image of a batch [B, H, W(, C)]."""
  images = np.asarray(images)
  if images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8:
    return images
  return np.stack([to_rgb(im) for im in images])


def resize(image: np.ndarray, height: int, width: int | None = None,
           box=None) -> np.ndarray:
  """Resizes a uint8 [H, W, 3] image with Pillow's antialiased bicubic filter.

  box: optional (left, upper, right, lower) crop applied before resizing (no copy).
  """
  width = height if width is None else width
  if box is None and image.shape[0] == height and image.shape[1] == width:
    return image
  out = Image.fromarray(image).resize((width, height), Image.BICUBIC, box=box)
  return np.asarray(out)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator,
                  pad: int = 4) -> np.ndarray:
  """CIFAR augmentation: zero-pad by `pad`, random crop back to HxW, random flip."""
  d = pad_crop_flip_draws(rng, pad)
  return pad_crop_flip_batch(image[None], [d["crop_y"]], [d["crop_x"]], [d["flip"]], pad)[0]


def pad_crop_flip_draws(rng: np.random.Generator, pad: int = 4) -> dict[str, Any]:
  """The random choices of pad_crop_flip, drawn in its order: crop offsets
  into the padded image, then the flip coin."""
  y, x = rng.integers(0, 2 * pad + 1, size=2)
  return {"crop_y": np.int32(y), "crop_x": np.int32(x), "flip": np.bool_(rng.random() < 0.5)}


def pad_crop_flip_batch(images: np.ndarray, crop_y, crop_x, flip, pad: int = 4) -> np.ndarray:
  """pad_crop_flip of a batch [B, H, W, C] with given draws, in a few array
  operations (the same pixels as one example at a time)."""
  b, h, w, c = images.shape
  padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), images.dtype)
  padded[:, pad:pad + h, pad:pad + w] = images
  out = np.empty_like(images)
  # One slice copy per image: ~5x cheaper than a fancy-index gather here.
  for i, (y, x, f) in enumerate(zip(np.asarray(crop_y).tolist(), np.asarray(crop_x).tolist(),
                                    np.asarray(flip).tolist())):
    window = padded[i, y:y + h, x:x + w]
    out[i] = window[:, ::-1] if f else window
  return out


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception crop: a random area/aspect box resized to size x size.

  Same sampling as torchvision: 10 tries, then fall back to a central crop with the
  aspect ratio clipped to `ratio`.
  """
  h, w = image.shape[:2]
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y = int(rng.integers(0, h - ch + 1))
      x = int(rng.integers(0, w - cw + 1))
      break
  else:
    in_ratio = w / h
    if in_ratio < ratio[0]:
      cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
      ch, cw = h, int(round(h * ratio[1]))
    else:
      cw, ch = w, h
    y, x = (h - ch) // 2, (w - cw) // 2
  return resize(image, size, size, box=(x, y, x + cw, y + ch))


def resize_center_crop(image: np.ndarray, size: int,
                       crop_fraction: float = INCEPTION_CROP_FRACTION) -> np.ndarray:
  """Eval for inception-style training: shorter side -> size / crop_fraction, center crop."""
  h, w = image.shape[:2]
  short = int(round(size / crop_fraction))
  if h <= w:
    nh, nw = short, max(short, int(round(w * short / h)))
  else:
    nw, nh = short, max(short, int(round(h * short / w)))
  image = resize(image, nh, nw)
  y, x = (nh - size) // 2, (nw - size) // 2
  return image[y:y + size, x:x + size]


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Mean over non-overlapping factor x factor blocks of a float [H, W, C] image."""
  h, w, c = image.shape
  return image.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def resize_float(image: np.ndarray, size: int) -> np.ndarray:
  """Antialiased downsampling of a float32 [H, W, C] image to size x size.

  Integer factors use exact area averaging; other factors use Pillow's BOX filter
  (area weighting with fractional pixel coverage) per channel in float mode.
  """
  h, w = image.shape[:2]
  if h == size and w == size:
    return image
  if h == w and h % size == 0:
    return area_downsample(image, h // size)
  chans = [
      np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
                 .resize((size, size), Image.BOX))
      for c in range(image.shape[-1])
  ]
  return np.stack(chans, axis=-1)


class Preprocess:
  """Callable that turns {'image': uint8, 'label': int} into a model-ready example.

  Output: {'image': float32 [S, S, 3]} or {'views': tuple of float32 [r, r, 3]},
  plus {'label': int32}; eval examples also carry 'mask' (float32, 1 real, 0 pad).
  A plain class (not a closure) so it pickles into grain worker processes.
  """

  def __init__(self, *, augment: str, image_size: int, resolutions=None,
               stats=None, train: bool):
    if augment not in AUGMENTS:
      raise ValueError(
          f"data.augment={augment!r} is unknown; use one of {AUGMENTS}")
    self.augment = augment
    self.image_size = int(image_size)
    self.resolutions = validate_resolutions(resolutions, self.image_size)
    self.train = train
    if stats is None:  # 'none': just scale to [0, 1]
      self.scale = np.full((3,), 1 / 255, np.float32)
      self.offset = np.zeros((3,), np.float32)
    else:
      mean, std = stats
      self.scale = (1.0 / (255.0 * std)).astype(np.float32)
      self.offset = (-mean / std).astype(np.float32)

  def geometric(self, image: np.ndarray, rng: np.random.Generator | None):
    """uint8 image -> augmented (train) or eval-cropped uint8 [S, S, 3] image."""
    s = self.image_size
    if self.train:
      if self.augment == "cifar":
        image = pad_crop_flip(image, rng)
      elif self.augment == "inception":
        return random_flip(random_resized_crop(image, rng, s), rng)
      return resize(image, s)
    if self.augment == "inception":
      return resize_center_crop(image, s)
    return resize(image, s)

  def finish(self, image: np.ndarray, label) -> dict[str, Any]:
    x = image.astype(np.float32)
    out: dict[str, Any] = {}
    if self.resolutions is None:
      out["image"] = x * self.scale + self.offset
    else:
      # Every view comes from the same augmented full-resolution image; normalizing
      # after resizing equals resizing after normalizing (per-channel affine).
      out["views"] = tuple(
          resize_float(x, r) * self.scale + self.offset for r in self.resolutions)
    out["label"] = np.int32(label)
    return out

  # Whole training batches at once: the per-example path costs ~0.4 CPU-ms per
  # image in Python, CPU that the train step then lacks on a small host. Only
  # the random draws stay per example (grain's per-position rng), so the
  # batches are the same numbers as the per-example path gives.

  @property
  def batchable(self) -> bool:
    """Whether train batches can use draw() + apply_batch() (fixed-size crops)."""
    return self.train and self.augment == "cifar"

  def draw(self, rng: np.random.Generator) -> dict[str, Any]:
    """One example's random choices (batchable transforms only)."""
    return pad_crop_flip_draws(rng)

  def apply_batch(self, images: np.ndarray, labels: np.ndarray,
                  draws: dict[str, np.ndarray]) -> dict[str, Any]:
    """uint8 images [B, H, W, 3], labels [B] and the stacked draw()s -> a
    train batch equal to stacking __call__ of each example with its rng."""
    x = pad_crop_flip_batch(images, draws["crop_y"], draws["crop_x"], draws["flip"])
    x = x.astype(np.float32)
    out: dict[str, Any] = {"label": np.asarray(labels, np.int32)}
    if self.resolutions is None:
      out["image"] = x * self.scale + self.offset
    else:  # resize_float per image, as finish() does
      out["views"] = tuple(
          np.stack([resize_float(e, r) for e in x]) * self.scale + self.offset
          for r in self.resolutions)
    return out

  def __call__(self, example, rng: np.random.Generator | None = None):
    image = self.geometric(to_rgb(example["image"]), rng)
    out = self.finish(np.ascontiguousarray(image), example["label"])
    if not self.train:
      out["mask"] = np.float32(example.get("mask", 1.0))
    return out


def views_shapes(image_size: int, resolutions: Sequence[int] | None):
  """Shapes of the image entries of one example (handy for model init)."""
  if resolutions is None:
    return {"image": (image_size, image_size, 3)}
  return {"views": tuple((r, r, 3) for r in resolutions)}
