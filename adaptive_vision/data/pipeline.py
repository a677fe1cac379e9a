"""grain input pipelines producing batches in the design.md "Batch contract".

Train: source -> per-epoch shuffle -> repeat forever -> per-example augmentation
(random_map: rng from (seed, global position)) -> global batches, of which each
process reads its own rows. With CIFAR augmentation only the random draws are
per example and each batch is read and augmented as whole arrays (the same
numbers, at a fraction of the host CPU). All of it is index-based (grain MapDataset), so the
stream of global batches is a pure function of (data config, seed, global batch
size): the same for any number of processes or workers. The iterator state is
the number of global batches read (`{'next_index': k}`, equal on every process),
so a run saved by N processes resumes on M with the same data order.

Checkpointing with Orbax (grain ships the handler; args are registered with it):

    it = make_train_iterator(cfg, global_batch_size=128, seed=0)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=iterator_checkpoint_args(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=..., data=iterator_checkpoint_args(it, restore=True)))

Without Orbax: `it.get_state()` is a small JSON-able dict; `it.set_state(state)`.
"""

from __future__ import annotations

import grain
import numpy as np

from adaptive_vision.data import augment as augment_lib
from adaptive_vision.data import sources


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple of"
        f" process_count={process_count}; change the batch size")
  return global_batch_size // process_count


def _derive_seed(*ints) -> int:
  """A uint32 seed from several ints (grain wants seeds in [0, 2**32))."""
  return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1)[0])


def preprocess(data_cfg, *, train: bool, views=None) -> augment_lib.Preprocess:
  """The per-example transform of the train (augmenting) or eval pipeline;
  `views`: None for one 'image', or the sizes of the 'views' to emit (what
  `adaptive_vision.models.data_views` derives from the models)."""
  get = sources.data_field
  stats = augment_lib.normalization_stats(get(data_cfg, "name"), get(data_cfg, "normalize"))
  return augment_lib.Preprocess(
      augment=get(data_cfg, "augment"), image_size=get(data_cfg, "image_size"),
      resolutions=views, stats=stats, train=train)


def _to_iter(ds: grain.MapDataset, data_cfg) -> grain.DatasetIterator:
  """MapDataset of batches -> prefetching iterator (threads, or worker processes)."""
  buffer = int(sources.data_field(data_cfg, "prefetch_buffer_size"))
  workers = int(sources.data_field(data_cfg, "num_workers"))
  if workers <= 0:
    # In-process: background threads compute whole batches, in order.
    read = grain.ReadOptions(num_threads=max(1, min(2, buffer)),
                             prefetch_buffer_size=max(1, buffer))
    return iter(ds.to_iter_dataset(read))
  # grain 0.2.x reads an absl flag in mp_prefetch and fails when the program did not
  # parse flags (google/grain#1355); flag defaults are what we want anyway.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  # Worker processes each take every workers-th batch; order is unchanged.
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
  mp = grain.MultiprocessingOptions(num_workers=workers,
                                    per_worker_buffer_size=max(1, buffer))
  return iter(ds.to_iter_dataset(read).mp_prefetch(mp))


def make_train_dataset(data_cfg, *, global_batch_size: int, seed: int, views=None,
                       process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The infinite MapDataset of local training batches (see make_train_iterator).

  Global batch b is rows [b * G, (b + 1) * G) of one shuffled, augmented stream;
  process p reads its rows [p * L, (p + 1) * L) (L = G / process_count) as its
  local batch b. So the global batches, and with them the data order, do not
  depend on the number of processes.
  """
  batch = local_batch_size(global_batch_size, process_count)
  src = sources.get_source(data_cfg, "train")
  if len(src) == 0:
    raise ValueError("the training split has no examples: use more data")
  pre = preprocess(data_cfg, train=True, views=views)
  # shuffle before repeat: each epoch gets its own permutation (seed folded with epoch;
  # it depends on the length only, so shuffling indices gives the same order).
  ds = (grain.MapDataset.range(len(src)) if pre.batchable else grain.MapDataset.source(src))
  ds = ds.shuffle(seed=_derive_seed(seed, 0)).repeat(None)
  # Per-example rng from (seed, global position): reproducible with any worker or
  # process count (the 0 is the process index of the one-stream layout it keeps).
  rng_seed = _derive_seed(seed, 1, 0)
  if not pre.batchable:
    ds = ds.random_map(pre, seed=rng_seed)
    # Batches of L consecutive examples; every process_count-th one from p is
    # process p's part of each global batch.
    return ds.batch(batch, drop_remainder=True)[process_index::process_count]
  # The same stream, cheaper: per example only its index and random draws (from
  # the same rng), then each batch read and augmented in whole-array operations.
  ds = ds.random_map(_Draws(pre), seed=rng_seed)
  ds = ds.batch(batch, drop_remainder=True)[process_index::process_count]
  return ds.map(_AugmentBatch(src, pre))


class _Draws:
  """index -> {'index', and the example's random choices} (picklable for workers)."""

  def __init__(self, pre: augment_lib.Preprocess):
    self.pre = pre

  def __call__(self, index, rng: np.random.Generator) -> dict:
    return dict(self.pre.draw(rng), index=np.int64(index))


class _AugmentBatch:
  """A batch of {'index', draws} -> the augmented train batch."""

  def __init__(self, src, pre: augment_lib.Preprocess):
    self.src, self.pre = src, pre

  def __call__(self, draws: dict) -> dict:
    draws = dict(draws)
    images, labels = sources.read_batch(self.src, draws.pop("index"))
    return self.pre.apply_batch(images, labels, draws)


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int, views=None,
                        process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of local batches (global_batch_size // process_count).

  Shuffled per epoch and augmented deterministically from `seed`; this process
  reads its rows of every global batch (make_train_dataset). Batches carry
  'views' of the sizes in `views` (lowest first), or one 'image'. The returned grain
  DatasetIterator has get_state() / set_state(); the state is the same on every
  process and for every process count (see iterator_checkpoint_args).
  """
  ds = make_train_dataset(data_cfg, global_batch_size=global_batch_size, seed=seed,
                          views=views, process_index=process_index, process_count=process_count)
  return _to_iter(ds, data_cfg)


class _Padded:
  """Source padded to `length` items; padding repeats real images with mask 0.

  Real images (not zeros) keep padding harmless for BatchNorm-free and BN models.
  """

  def __init__(self, src, length: int):
    self.src, self.length, self.n = src, length, len(src)

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    i = int(i)
    ex = dict(self.src[i % self.n])
    ex["mask"] = 1.0 if i < self.n else 0.0
    return ex


def make_eval_iterator(data_cfg, split: str, *, global_batch_size: int, views=None,
                       process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """One deterministic pass over `split` with no augmentation.

  The split is padded to a multiple of global_batch_size, so every process yields
  the same number of full local batches; global batch b holds examples
  [b * global_batch_size, (b + 1) * global_batch_size) and padding has mask 0.
  Every batch carries 'mask' (float32), and each example appears exactly once
  with mask 1 across processes.
  """
  batch = local_batch_size(global_batch_size, process_count)
  src = sources.get_source(data_cfg, split)
  if len(src) == 0:
    raise ValueError(f"split {split!r} has no examples")
  padded = -(-len(src) // global_batch_size) * global_batch_size
  ds = grain.MapDataset.source(_Padded(src, padded))[process_index::process_count]
  ds = ds.map(preprocess(data_cfg, train=False, views=views)).batch(batch, drop_remainder=False)
  return _to_iter(ds, data_cfg)


def load_image(data_cfg, path, views=None) -> dict:
  """One image file as the eval pipeline feeds it to the model.

  Decoded as the folder source decodes its files (`data.cache_image_size`
  included), then the eval preprocessing of `make_eval_iterator` (resize or
  center crop, `views` as `models.data_views` derives them, normalization).
  Returns {'image': float32 [S, S, 3]}
  or {'views': tuple of float32 [r, r, 3]}. A file that is not an image
  raises ValueError naming it.
  """
  size = sources.data_field(data_cfg, "cache_image_size")
  try:
    image = sources.decode_image(str(path), None if size is None else int(size))
  except (OSError, ValueError, SyntaxError) as e:  # PIL's ways of saying "not an image"
    why = " ".join(str(e).replace(repr(str(path)), "").split()) or type(e).__name__
    raise ValueError(f"{path} is not an image ({why})") from None
  out = preprocess(data_cfg, train=False, views=views)({"image": image, "label": 0})
  return {k: v for k, v in out.items() if k in ("image", "views")}


def num_eval_batches(data_cfg, split: str, *, global_batch_size: int) -> int:
  """Number of batches make_eval_iterator yields (the same on every process)."""
  return -(-sources.num_examples(data_cfg, split) // global_batch_size)


def iterator_checkpoint_args(iterator, restore: bool = False):
  """Orbax args for saving / restoring a grain iterator's position.

  Returns grain.checkpoint.CheckpointSave(iterator) or CheckpointRestore(iterator);
  both are registered with grain's Orbax CheckpointHandler, which writes one small
  JSON file per process. Restoring mutates `iterator` in place (and returns it).
  """
  from grain import checkpoint as grain_checkpoint  # pylint: disable=g-import-not-at-top
  if not hasattr(grain_checkpoint, "CheckpointSave"):
    raise ImportError("grain.checkpoint.CheckpointSave needs orbax-checkpoint installed")
  cls = grain_checkpoint.CheckpointRestore if restore else grain_checkpoint.CheckpointSave
  return cls(item=iterator)
