"""Host sharding: disjoint, complete parts per process; evaluation padded and masked."""

import collections

import numpy as np
import pytest

from data_helpers import digits_data_dir, write_folder  # noqa: F401  (fixture)

pytest.importorskip("tensorflow")

from nfnets_jax.data import load, sharding  # noqa: E402
from nfnets_jax.data.sources import open_source  # noqa: E402


def test_shard_sizes_and_eval_steps():
  for n in (0, 1, 10, 11, 355):
    for p in (1, 2, 3, 8):
      sizes = sharding.shard_sizes(n, p)
      assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
      for batch in (1, 4, 24):
        steps = sharding.eval_steps(sizes, batch)
        assert steps * batch >= max(sizes) and (steps - 1) * batch < max(sizes) or n == 0


def test_process_defaults_come_from_jax_and_are_validated():
  import jax
  assert sharding.resolve_process() == (jax.process_index(), jax.process_count())
  assert sharding.resolve_process(2, 3) == (2, 3)
  with pytest.raises(ValueError, match="process_index"):
    sharding.resolve_process(3, 3)
  with pytest.raises(ValueError, match="process_count"):
    sharding.resolve_process(0, 0)


@pytest.mark.parametrize("count", [2, 3])
def test_training_parts_are_disjoint_and_complete(digits_data_dir, count):
  source = open_source("digits", "train", data_dir=digits_data_dir)
  n = source.num_examples("train")
  parts = []
  for index in range(count):
    ds, size = source.read("train", process_index=index, process_count=count,
                           shuffle_files=True, seed=None)
    names = [ex["name"] for ex in ds.as_numpy_iterator()]
    assert len(names) == size == source.part_sizes("train", count)[index]
    parts.append(set(names))
  assert sum(len(p) for p in parts) == n
  assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
  assert len(set().union(*parts)) == n


def _real_examples(batches):
  """(label, image bytes) of every unmasked example, and the list of batches."""
  out, batch_list = [], list(batches)
  for b in batch_list:
    images = b["images"].reshape((-1,) + b["images"].shape[-3:])
    for image, label, mask in zip(images, b["labels"].ravel(), b["mask"].ravel()):
      if mask:
        out.append((int(label), image.tobytes()))
  return out, batch_list


def _check_eval_sharding(name, split, count, batch_dims, **kwargs):
  whole, _ = _real_examples(load(name, split, is_training=False, batch_dims=batch_dims,
                                 process_index=0, process_count=1, **kwargs))
  n = len(whole)
  per_batch = int(np.prod(batch_dims))
  union = []
  for index in range(count):
    batches = load(name, split, is_training=False, batch_dims=batch_dims, process_index=index,
                   process_count=count, **kwargs)
    real, batch_list = _real_examples(batches)
    sizes = open_source(name, split, data_dir=kwargs.get("data_dir")).part_sizes(split, count)
    assert sum(sizes) == n
    assert len(batch_list) == batches.steps == sharding.eval_steps(sizes, per_batch)
    assert len(real) == batches.num_examples == sizes[index]
    masks = np.concatenate([b["mask"].ravel() for b in batch_list])
    assert np.all(masks[:len(real)] == 1) and np.all(masks[len(real):] == 0)
    union.extend(real)
  # Every example exactly once across processes (as multisets: duplicates stay counted).
  assert collections.Counter(union) == collections.Counter(whole)
  return n


@pytest.mark.parametrize("count", [2, 3])
def test_eval_covers_every_example_once_with_padding(digits_data_dir, count):
  n = _check_eval_sharding("digits", "test", count, (2, 4), image_size=8,
                           eval_preproc="resize_crop_1.0", data_dir=digits_data_dir)
  assert n % (count * 8) != 0  # The remainder case is the one exercised.


@pytest.mark.parametrize("split", ["test[10:47]", "train[:7]+test[:5]"])
def test_sliced_and_union_splits_are_covered(digits_data_dir, split):
  # TFDS splits each member of a union on its own: 7 + 5 over 3 processes is 3+2, 2+2, 2+1,
  # so one part exceeds ceil(12 / 3) and padding must follow the largest part.
  _check_eval_sharding("digits", split, 3, (4,), image_size=8,
                       eval_preproc="resize_crop_1.0", data_dir=digits_data_dir)


def test_folder_eval_sharding(tmp_path):
  write_folder(tmp_path / "imgs" / "val", {"x": 4, "y": 3, "z": 4})
  n = _check_eval_sharding(f"folder:{tmp_path / 'imgs'}", "val", 3, (2,), image_size=8)
  assert n == 11
