"""Tests for adaptive_vision.data: sources, folder cache, augmentation, grain pipelines.

Small and fast (2-core machine): tiny synthetic / folder datasets; no network.
"""

import logging
import os
import tarfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from adaptive_vision import data
from adaptive_vision.data import augment, sources
from configs.common import base_config

CLASSES = ("cat", "ant", "bee")  # unsorted on purpose: index = sorted order
PER_CLASS = 4
SIZE = 8
CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"


def cfg_for(tmp_path, **kw):
  """The base config's data section, on small synthetic data unless `kw` says otherwise."""
  cfg = base_config().data
  cfg.update(source="synthetic", name="synthetic", path=None, augment="none", val_size=0,
             cache_dir=str(tmp_path / "cache"))
  unknown = set(kw) - set(cfg)
  if unknown:
    raise ValueError(f"unknown data config fields {sorted(unknown)}")
  cfg.update(kw)
  return cfg


def image_key(x):
  """Identity of an image; float images with normalize='none' are mapped back to uint8."""
  x = np.asarray(x)
  if x.dtype != np.uint8:
    x = np.round(x * 255).astype(np.uint8)
  return x.tobytes()


def take(it, n):
  return [next(it) for _ in range(n)]


def batches_equal(a, b):
  return all(np.array_equal(x["image"], y["image"]) and
             np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- fixtures


def _unique_image(split, k, i):
  """8x8 RGB image whose pixels encode (split, class, index): every image differs."""
  rng = np.random.default_rng([split == "test", k, i])
  return rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """The same tiny dataset as a directory, one .tar.gz, and <split>.tar.gz files."""
  base = tmp_path_factory.mktemp("folders")
  root = base / "dir"
  expected = {}
  for split in ("train", "test"):
    for k, c in enumerate(CLASSES):
      (root / split / c).mkdir(parents=True)
      for i in range(PER_CLASS):
        img = _unique_image(split, k, i)
        Image.fromarray(img).save(root / split / c / f"{i:04d}.png")
        expected.setdefault(split, {})[image_key(img)] = sorted(CLASSES).index(c)
  single = base / "all.tar.gz"
  with tarfile.open(single, "w:gz") as tf:
    tf.add(root, arcname="mydata")  # members: mydata/<split>/<class>/<file>
  per_split = base / "per_split"
  per_split.mkdir()
  for split in ("train", "test"):
    with tarfile.open(per_split / f"{split}.tar.gz", "w:gz") as tf:
      tf.add(root / split, arcname=split)
  return {"dir": root, "tar": single, "per_split": per_split, "expected": expected}


# ----------------------------------------------------------------------------- synthetic + pipeline


def test_train_batches_follow_batch_contract(tmp_path):
  cfg = cfg_for(tmp_path, augment="cifar", num_classes=10, synthetic_train_size=64)
  batch = next(data.make_train_iterator(cfg, global_batch_size=16, seed=0))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() < 10
  # default synthetic normalization is 0.5/0.5: values lie in [-1, 1]
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_same_seed_same_batches_different_seed_differs(tmp_path):
  cfg = cfg_for(tmp_path, augment="cifar", synthetic_train_size=64)
  a = take(data.make_train_iterator(cfg, global_batch_size=8, seed=1), 10)  # > 1 epoch
  b = take(data.make_train_iterator(cfg, global_batch_size=8, seed=1), 10)
  c = take(data.make_train_iterator(cfg, global_batch_size=8, seed=2), 10)
  assert batches_equal(a, b)
  assert not any(np.array_equal(x["label"], y["label"]) and
                 np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
  # epochs are reshuffled: batch 0 of epoch 2 (index 8) differs from batch 0
  assert not np.array_equal(a[0]["image"], a[8]["image"])


def test_processes_read_disjoint_slices(tmp_path):
  n = 48
  cfg = cfg_for(tmp_path, augment="none", normalize="none", synthetic_train_size=n)
  src = data.get_source(cfg, "train")
  all_keys = {image_key(src[i]["image"]) for i in range(n)}
  assert len(all_keys) == n  # synthetic images are unique
  seen = []
  for p in range(2):
    it = data.make_train_iterator(cfg, global_batch_size=8, seed=0, process_index=p,
                                  process_count=2)
    keys = set()
    for b in take(it, n // 2 // 4):  # one local epoch: 24 examples, batches of 4
      assert b["image"].shape[0] == 4
      keys |= {image_key(x) for x in b["image"]}
    assert len(keys) == n // 2
    seen.append(keys)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == all_keys
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.make_train_iterator(cfg, global_batch_size=9, seed=0, process_count=2)


def test_iterator_state_reproduces_next_batches(tmp_path):
  cfg = cfg_for(tmp_path, augment="cifar", synthetic_train_size=40)
  it = data.make_train_iterator(cfg, global_batch_size=8, seed=5)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)  # crosses an epoch boundary (5 batches per epoch)
  fresh = data.make_train_iterator(cfg, global_batch_size=8, seed=5)
  fresh.set_state(state)
  assert batches_equal(take(fresh, 4), expected)


def test_global_batches_do_not_depend_on_process_count(tmp_path):
  """Process p's batch b is rows [p*L, (p+1)*L) of global batch b, for any P;
  with one process the stream is the one of the per-process layout of older
  versions (so their single-process checkpoints keep their data order)."""
  import grain
  from adaptive_vision.data import pipeline
  cfg = cfg_for(tmp_path, augment="cifar", synthetic_train_size=40)
  one = data.make_train_dataset(cfg, global_batch_size=8, seed=3)
  src = sources.get_source(cfg, "train")
  old = grain.MapDataset.source(src)[0::1].shuffle(seed=pipeline._derive_seed(3, 0)).repeat(None)
  old = old.random_map(pipeline.preprocess(cfg, train=True),
                       seed=pipeline._derive_seed(3, 1, 0)).batch(8, drop_remainder=True)
  for count in (2, 4):
    parts = [data.make_train_dataset(cfg, global_batch_size=8, seed=3, process_index=p,
                                     process_count=count) for p in range(count)]
    for b in range(12):  # > 2 epochs
      for k in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([q[b][k] for q in parts]), one[b][k])
        np.testing.assert_array_equal(old[b][k], one[b][k])


@pytest.mark.parametrize("views", [None, (4, SIZE)])
def test_whole_batch_augmentation_equals_the_per_example_path(tmp_path, folders, views):
  """CIFAR-augmented train batches are read and augmented as arrays; they are
  the numbers of the per-example pipeline (random_map of Preprocess, then
  batch) on a folder source with a holdout, also with multi-resolution views."""
  import grain
  from adaptive_vision.data import pipeline
  cfg = cfg_for(tmp_path, source="folder", name="tiny", path=str(folders["dir"]),
                num_classes=3, image_size=SIZE, augment="cifar", val_size=2)
  pre = pipeline.preprocess(cfg, train=True, views=views)
  assert pre.batchable
  src = sources.get_source(cfg, "train")
  assert hasattr(src, "read_many")  # the array gather, not the item-by-item fallback
  ref = grain.MapDataset.source(src).shuffle(seed=pipeline._derive_seed(7, 0)).repeat(None)
  ref = ref.random_map(pre, seed=pipeline._derive_seed(7, 1, 0)).batch(4, drop_remainder=True)
  new = data.make_train_dataset(cfg, global_batch_size=4, seed=7, views=views)
  key = "image" if views is None else "views"
  for b in range(8):  # > 2 epochs of 10 examples
    got, want = new[b], ref[b]
    assert set(got) == set(want) == {key, "label"}
    np.testing.assert_array_equal(got["label"], want["label"])
    assert got["label"].dtype == want["label"].dtype == np.int32
    pairs = [(got[key], want[key])] if views is None else list(zip(got[key], want[key]))
    assert len(pairs) == (1 if views is None else len(views))
    for g, w in pairs:
      assert g.dtype == w.dtype == np.float32 and g.shape == w.shape
      np.testing.assert_array_equal(g, w)


def test_iterator_state_moves_between_process_counts(tmp_path):
  cfg = cfg_for(tmp_path, augment="cifar", synthetic_train_size=40)
  two = [data.make_train_iterator(cfg, global_batch_size=8, seed=1, process_index=p,
                                  process_count=2) for p in range(2)]
  for it in two:
    take(it, 3)
  states = [it.get_state() for it in two]
  assert states[0] == states[1] == {"next_index": 3}  # one global position
  expected = [{k: np.concatenate([a[k], b[k]]) for k in a}
              for a, b in zip(take(two[0], 4), take(two[1], 4))]
  one = data.make_train_iterator(cfg, global_batch_size=8, seed=1)
  one.set_state(states[0])
  assert batches_equal(take(one, 4), expected)
  # and back: one process's position continued by two
  again = [data.make_train_iterator(cfg, global_batch_size=8, seed=1, process_index=p,
                                    process_count=2) for p in range(2)]
  for it in again:
    it.set_state(one.get_state())
  after = take(one, 2)
  for b, x, y in zip(after, take(again[0], 2), take(again[1], 2)):
    np.testing.assert_array_equal(b["image"], np.concatenate([x["image"], y["image"]]))


def test_orbax_checkpoint_roundtrip(tmp_path):
  import orbax.checkpoint as ocp
  from grain import checkpoint as grain_checkpoint
  cfg = cfg_for(tmp_path, augment="cifar", synthetic_train_size=40)
  it = data.make_train_iterator(cfg, global_batch_size=8, seed=0)
  take(it, 2)
  ckpt = ocp.Checkpointer(grain_checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / "ckpt", args=data.iterator_checkpoint_args(it))
  expected = take(it, 2)
  fresh = data.make_train_iterator(cfg, global_batch_size=8, seed=0)
  ckpt.restore(tmp_path / "ckpt", args=data.iterator_checkpoint_args(fresh, restore=True))
  assert batches_equal(take(fresh, 2), expected)


@pytest.mark.slow  # spawns worker processes (~10 s)
def test_worker_processes_give_identical_batches(tmp_path):
  cfg = cfg_for(tmp_path, augment="cifar", synthetic_train_size=64)
  a = take(data.make_train_iterator(cfg, global_batch_size=8, seed=3), 5)
  cfg.num_workers = 2
  it = data.make_train_iterator(cfg, global_batch_size=8, seed=3)
  b = take(it, 5)
  it.close()
  assert batches_equal(a, b)


def test_multiresolution_views_are_area_downsamples(tmp_path):
  cfg = cfg_for(tmp_path, augment="cifar", name="cifar10")
  batch = next(data.make_train_iterator(cfg, global_batch_size=4, seed=0, views=(8, 16, 32)))
  assert "image" not in batch
  views = batch["views"]
  assert [v.shape for v in views] == [(4, r, r, 3) for r in (8, 16, 32)]
  assert all(v.dtype == np.float32 for v in views)
  hi = views[-1]
  for v, f in ((views[0], 4), (views[1], 2)):
    area = hi.reshape(4, hi.shape[1] // f, f, hi.shape[2] // f, f, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(v, area, atol=1e-4)
  # non-integer factor (Pillow BOX filter) and eval batches carry views too
  ev = next(data.make_eval_iterator(cfg, "test", global_batch_size=4, views=(24, 32)))
  assert [v.shape for v in ev["views"]] == [(4, 24, 24, 3), (4, 32, 32, 3)]
  np.testing.assert_allclose(ev["views"][0].mean(), ev["views"][1].mean(), atol=0.05)


@pytest.mark.parametrize("res, msg", [((16, 8, 32), "strictly increasing"),
                                      ((8, 16), "must end with data.image_size=32"),
                                      ((16, 16, 32), "strictly increasing")])
def test_bad_resolutions_rejected(tmp_path, res, msg):
  cfg = cfg_for(tmp_path)
  with pytest.raises(ValueError, match=msg):
    data.make_train_iterator(cfg, global_batch_size=4, seed=0, views=res)


def test_eval_iterator_covers_each_example_once(tmp_path):
  n = 50
  cfg = cfg_for(tmp_path, normalize="none", synthetic_test_size=n)
  src = data.get_source(cfg, "test")
  expected = [src[i]["image"] for i in range(n)]
  counts = {}
  nb = data.num_eval_batches(cfg, "test", global_batch_size=16)
  assert nb == 4
  for p in range(2):
    batches = list(data.make_eval_iterator(cfg, "test", global_batch_size=16,
                                           process_index=p, process_count=2))
    assert len(batches) == nb  # every process runs the same number of steps
    for b in batches:
      assert b["image"].shape == (8, 32, 32, 3)
      assert b["mask"].dtype == np.float32 and b["mask"].shape == (8,)
      for img, m in zip(b["image"], b["mask"]):
        if m:
          counts[image_key(img)] = counts.get(image_key(img), 0) + 1
    # padded last global batch: 50 = 3*16 + 2 -> 2 real examples, one per process
    assert batches[-1]["mask"].sum() == 1 and batches[0]["mask"].sum() == 8
  assert sorted(counts.values()) == [1] * n
  assert set(counts) == {image_key(e) for e in expected}


def test_val_holdout_disjoint_and_sized(tmp_path):
  cfg = cfg_for(tmp_path, normalize="none", synthetic_train_size=100, val_size=20)
  train, val = data.get_source(cfg, "train"), data.get_source(cfg, "val")
  assert len(val) == 20 and len(train) == 80
  assert not set(train.indices) & set(val.indices)
  assert set(train.indices) | set(val.indices) == set(range(100))
  assert data.dataset_info(cfg) == dict(num_classes=10, train_size=80, val_size=20,
                                        test_size=512)
  cfg.split_seed = 1
  assert set(data.get_source(cfg, "val").indices) != set(val.indices)
  cfg.split_seed, cfg.train_size, cfg.test_size = 0, 30, 7
  limited = data.get_source(cfg, "train")
  np.testing.assert_array_equal(limited.indices, train.indices[:30])
  assert data.num_examples(cfg, "test") == 7
  cfg.train_size = 81
  with pytest.raises(ValueError, match="train_size=81 exceeds the 80"):
    data.get_source(cfg, "train")


def test_synthetic_splits_share_classes_not_examples(tmp_path):
  cfg = cfg_for(tmp_path, normalize="none", synthetic_train_size=64,
                synthetic_test_size=64, num_classes=4)
  tr, te = data.get_source(cfg, "train"), data.get_source(cfg, "test")
  assert not np.array_equal(tr[0]["image"], te[0]["image"])
  again = data.get_source(cfg, "train")
  assert np.array_equal(tr[3]["image"], again[3]["image"])  # deterministic
  # class means of train and test agree far better than across classes (learnable)
  def means(s):
    imgs = np.stack([s[i]["image"] for i in range(len(s))]).astype(np.float32)
    labels = np.array([s[i]["label"] for i in range(len(s))])
    return np.stack([imgs[labels == k].mean(0) for k in range(4)])
  mtr, mte = means(tr), means(te)
  same = np.abs(mtr - mte).mean()
  other = np.abs(mtr - np.roll(mte, 1, axis=0)).mean()
  assert same * 3 < other


# ----------------------------------------------------------------------------- augmentation


def test_pad_crop_flip_is_a_crop_of_the_zero_padded_image():
  """The crop is written without np.pad; it must equal the definition (pad by
  4 with zeros, crop at the drawn offset, flip on the drawn coin), with the same
  random draws in the same order, also for images smaller than the padding."""
  src = np.random.default_rng(0)
  for shape in [(32, 32, 3), (9, 7, 3), (3, 3, 1)]:
    for seed in range(40):
      img = src.integers(1, 256, shape, dtype=np.uint8)
      draws = np.random.default_rng(seed)
      y, x = draws.integers(0, 9, size=2)
      flip = draws.random() < 0.5
      padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
      want = padded[y:y + shape[0], x:x + shape[1]]
      want = want[:, ::-1] if flip else want
      got = augment.pad_crop_flip(img, np.random.default_rng(seed))
      assert got.dtype == img.dtype
      np.testing.assert_array_equal(got, want, err_msg=f"{shape} seed {seed}")


def test_augmentations_shapes_and_normalization():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  assert augment.random_resized_crop(img, rng, 24).shape == (24, 24, 3)
  assert augment.resize_center_crop(img, 24).shape == (24, 24, 3)
  assert augment.pad_crop_flip(img, rng).shape == img.shape
  tr = augment.Preprocess(augment="inception", image_size=24, train=True, stats=None)
  ev = augment.Preprocess(augment="inception", image_size=24, train=False, stats=None)
  out = tr({"image": img, "label": 3}, rng)
  assert out["image"].shape == (24, 24, 3) and out["label"] == 3
  assert ev({"image": img, "label": 3})["mask"] == 1.0
  mean, std = augment.normalization_stats("cifar10:3.0.2", "auto")
  np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465])
  assert augment.normalization_stats("whatever", "none") is None
  with pytest.raises(ValueError, match=r"\[0, 1\] pixel scale"):
    augment.normalization_stats("x", ((125.0,) * 3, (60.0,) * 3))
  flat = np.full((8, 8, 3), 128, np.uint8)
  p = augment.Preprocess(augment="none", image_size=8, train=False,
                         stats=augment.normalization_stats("x", "auto"))
  np.testing.assert_allclose(p({"image": flat, "label": 0})["image"], 128 / 255 / 0.5 - 1,
                             atol=1e-6)


# ----------------------------------------------------------------------------- folders


def _all_examples(src):
  return {image_key(src[i]["image"]): src[i]["label"] for i in range(len(src))}


@pytest.mark.parametrize("layout", ["dir", "tar", "per_split"])
def test_folder_layouts_give_same_examples(tmp_path, folders, layout):
  cfg = cfg_for(tmp_path, source="folder", name="tiny", path=str(folders[layout]),
                num_classes=3, image_size=SIZE)
  for split in ("train", "test"):
    src = data.get_source(cfg, split)
    assert len(src) == len(CLASSES) * PER_CLASS
    assert src.class_names == sorted(CLASSES)
    assert _all_examples(src) == folders["expected"][split]
    assert src[0]["image"].dtype == np.uint8 and src[0]["image"].shape == (SIZE, SIZE, 3)
  # stored in a fixed shuffled order: the first 6 examples are not all one class
  assert len({data.get_source(cfg, "train")[i]["label"] for i in range(6)}) > 1
  batch = next(data.make_train_iterator(cfg, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, SIZE, SIZE, 3)


def test_folder_converted_once_and_refreshed_on_change(tmp_path, folders, monkeypatch):
  import shutil
  root = tmp_path / "copy"
  shutil.copytree(folders["dir"], root)
  cfg = cfg_for(tmp_path, source="folder", path=str(root), num_classes=3, image_size=SIZE)
  src = data.get_source(cfg, "train")
  cache = Path(src.base.images_path).parent
  assert cache.is_relative_to(tmp_path / "cache")
  meta_mtime = (cache / "meta.json").stat().st_mtime_ns

  def no_decode(*a, **k):
    raise AssertionError("decoded again")
  with monkeypatch.context() as m:
    m.setattr(sources, "_decode_image", no_decode)
    again = data.get_source(cfg, "train")
    assert _all_examples(again) == _all_examples(src)
  assert (cache / "meta.json").stat().st_mtime_ns == meta_mtime
  # a changed file changes the fingerprint -> converted again
  changed = root / "train" / "ant" / "0000.png"
  new_img = np.zeros((SIZE, SIZE, 3), np.uint8)
  Image.fromarray(new_img).save(changed)
  os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
  refreshed = data.get_source(cfg, "train")
  assert image_key(new_img) in _all_examples(refreshed)
  assert len(list(cache.glob("images-*.npy"))) == 1  # stale version removed


def test_bad_image_error_or_skip(tmp_path, folders, caplog):
  import shutil
  root = tmp_path / "bad"
  shutil.copytree(folders["dir"], root)
  bad = root / "train" / "bee" / "broken.jpg"
  bad.write_bytes(b"not an image at all")
  cfg = cfg_for(tmp_path, source="folder", path=str(root), num_classes=3, image_size=SIZE)
  with pytest.raises(ValueError, match="broken.jpg.*on_bad_image"):
    data.get_source(cfg, "train")
  cfg.on_bad_image = "skip"
  with caplog.at_level(logging.WARNING):
    src = data.get_source(cfg, "train")
  assert len(src) == len(CLASSES) * PER_CLASS
  assert "broken.jpg" in caplog.text
  cfg.on_bad_image = "error"  # the skip-built cache must not hide the bad file
  with pytest.raises(ValueError, match="broken.jpg"):
    data.get_source(cfg, "train")


def test_mixed_sizes_need_cache_image_size(tmp_path, folders):
  import shutil
  root = tmp_path / "mixed"
  shutil.copytree(folders["dir"], root)
  odd = root / "train" / "cat" / "zz_big.png"
  Image.fromarray(np.full((12, 10, 3), 7, np.uint8)).save(odd)
  cfg = cfg_for(tmp_path, source="folder", path=str(root), num_classes=3, image_size=SIZE)
  with pytest.raises(ValueError, match="zz_big.png|cache_image_size") as err:
    data.get_source(cfg, "train")
  assert "cache_image_size" in str(err.value) and "zz_big.png" in str(err.value)
  cfg.cache_image_size = 6
  src = data.get_source(cfg, "train")
  assert len(src) == len(CLASSES) * PER_CLASS + 1 and src[0]["image"].shape == (6, 6, 3)


def test_missing_folder_paths(tmp_path, folders):
  cfg = cfg_for(tmp_path, source="folder", path=str(tmp_path / "nope"), image_size=SIZE)
  with pytest.raises(FileNotFoundError, match="nope.*<split>/<class>/<image>"):
    data.get_source(cfg, "train")
  cfg.path = str(folders["dir"])
  cfg.test_split = "validation"
  with pytest.raises(FileNotFoundError, match="'validation'.*validation.tar.gz"):
    data.get_source(cfg, "test")


def test_labels_outside_num_classes(tmp_path, folders):
  cfg = cfg_for(tmp_path, source="folder", path=str(folders["dir"]), num_classes=2,
                image_size=SIZE)
  with pytest.raises(ValueError, match=r"4 of 12 labels.*num_classes=3"):
    data.get_source(cfg, "train")


# ----------------------------------------------------------------------------- tfds


def test_tfds_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  cfg = cfg_for(tmp_path, source="tfds", name="cifar10", path=str(tmp_path / "tfds"),
                augment="cifar", val_size=4)
  # mock_data replaces reading; is_prepared is patched because mock data dirs are empty.
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE), \
       mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    src = data.get_source(cfg, "train")
    assert len(src) == 16 and data.num_examples(cfg, "val") == 4
    ex = src[0]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    batch = next(data.make_train_iterator(cfg, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
    cfg.num_classes = 5
    with pytest.raises(ValueError, match="num_classes=10"):
      data.get_source(cfg, "train")


def test_tfds_unknown_or_unprepared_fails_fast(tmp_path):
  cfg = cfg_for(tmp_path, source="tfds", name="no_such_dataset_xyz",
                path=str(tmp_path / "tfds"))
  t0 = time.time()
  with pytest.raises(ValueError, match="no_such_dataset_xyz.*source='folder'"):
    data.get_source(cfg, "train")
  cfg.name = "cifar10"
  with pytest.raises(data.DatasetNotPreparedError,
                     match=r"'cifar10' is not prepared in .*tfds build cifar10"):
    data.get_source(cfg, "train")
  assert time.time() - t0 < 5


# ----------------------------------------------------------------------------- real data


@pytest.mark.requires("cifar10")
def test_real_cifar10_test_split(tmp_path):
  cfg = cfg_for(tmp_path, source="folder", name="cifar10", path=str(CIFAR10),
                augment="cifar")
  t0 = time.time()
  src = data.get_source(cfg, "test")
  elapsed = time.time() - t0
  assert len(src) == 10_000
  assert src.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                             "frog", "horse", "ship", "truck"]
  assert np.bincount(src.labels, minlength=10).tolist() == [1000] * 10
  assert src[0]["image"].shape == (32, 32, 3)
  assert elapsed < 30, f"conversion took {elapsed:.1f} s"
  ev = next(data.make_eval_iterator(cfg, "test", global_batch_size=256))
  assert ev["image"].shape == (256, 32, 32, 3) and ev["mask"].all()
  assert abs(float(ev["image"].mean())) < 0.3  # cifar10 normalization roughly centers
