"""'folder:<path>' datasets (data/folder.py): TFDS ImageFolder's files and order, the
held-out split of a single class tree, per-process parts, corrupt files counted."""

import collections

import pytest
import tensorflow_datasets as tfds

from data_helpers import digits_data_dir, encode, random_image, write_folder  # noqa: F401
from nfnets_jax.data import load
from nfnets_jax.data.sources import open_source


def _files(source, split, index=0, count=1):
  ds, size = source.read(split, process_index=index, process_count=count, shuffle_files=False,
                         seed=None)
  out = [(ex["name"].decode(), int(ex["label"])) for ex in ds.as_numpy_iterator()]
  assert len(out) == size
  return out


def test_split_tree_reads_what_tfds_image_folder_reads(tmp_path):
  root = tmp_path / "imgs"
  write_folder(root / "train", {"cat": 3, "dog": 4, "emu": 2})
  write_folder(root / "val", {"cat": 1, "dog": 2}, fmt="PNG", seed=50)
  source = open_source(f"folder:{root}", "train")
  builder = tfds.ImageFolder(str(root))
  assert source.class_names == tuple(builder.info.features["label"].names) == ("cat", "dog", "emu")
  for split in ("train", "val"):
    theirs = [(ex["image/filename"].decode(), int(ex["label"])) for ex in tfds.as_numpy(
        builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()}))]
    assert _files(source, split) == theirs  # the same files, labels and order
  ds, _ = source.read("train", process_index=0, process_count=1, shuffle_files=False, seed=None)
  first = next(ds.as_numpy_iterator())
  assert first["image"] == open(first["name"], "rb").read()
  # Asked for 'validation', a tree without a validation/ folder gives its val/.
  assert source.num_examples("validation") == 3 and _files(source, "validation") == \
      _files(source, "val")
  # Three processes: disjoint parts that together are the split.
  parts = [_files(source, "train", i, 3) for i in range(3)]
  assert sorted(sum(parts, [])) == sorted(_files(source, "train"))
  assert [len(p) for p in parts] == source.part_sizes("train", 3) == [3, 3, 3]
  with pytest.raises(ValueError, match=r"'test'.*\['train', 'val'\]"):
    open_source(f"folder:{root}", "test")
  with pytest.raises(ValueError, match="val_fraction=0.2 holds out part of a single"):
    open_source(f"folder:{root}", "train", val_fraction=0.2)


def test_val_fraction_holds_out_each_class_deterministically(tmp_path, caplog):
  root = tmp_path / "pets"
  write_folder(root, {"cat": 10, "dog": 5})
  name = f"folder:{root}"
  source = open_source(name, "validation", val_fraction=0.2)
  held, kept = _files(source, "validation"), _files(source, "train")
  assert collections.Counter(label for _, label in held) == {0: 2, 1: 1}
  assert sorted(held + kept) == sorted(_files(open_source(name, "train"), "train"))
  assert _files(open_source(name, "validation", val_fraction=0.2), "validation") == held
  # Files added to another class leave this class's held-out files where they were.
  for j in range(5):
    (root / "dog" / f"new_{j}.jpg").write_bytes(encode(random_image(900 + j, 20, 24)))
  grown = _files(open_source(name, "validation", val_fraction=0.2), "validation")
  assert sorted(f for f, label in grown if label == 0) == sorted(f for f, label in held
                                                                 if label == 0)
  assert collections.Counter(label for _, label in grown) == {0: 2, 1: 2}
  # Through the pipeline, a corrupt file is skipped and counted wherever it lands.
  garbage = root / "cat" / "garbage.jpg"
  garbage.write_bytes(b"not an image at all")
  skipped, seen = [], 0
  for split in ("train", "validation"):
    batches = load(name, split, is_training=False, batch_dims=(4,), image_size=12,
                   val_fraction=0.2)
    seen += sum(int(b["mask"].sum()) for b in batches)
    skipped += batches.skipped_files
  assert skipped == [str(garbage)] and seen == 20
  with pytest.raises(ValueError, match="holds out no image"):
    open_source(name, "train", val_fraction=0.01)
  with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\).*1.0"):
    load(name, "train", is_training=False, batch_dims=(4,), image_size=12, val_fraction=1.0)


def test_class_names_of_tfds_datasets(digits_data_dir):
  source = open_source("digits", "train", data_dir=digits_data_dir)
  assert source.class_names == tuple(str(i) for i in range(10))
  with pytest.raises(ValueError, match="applies to 'folder:<path>' datasets only"):
    open_source("digits", "train", data_dir=digits_data_dir, val_fraction=0.1)


def test_empty_folder_is_a_clear_error(tmp_path):
  (tmp_path / "empty" / "cat").mkdir(parents=True)
  (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match="holds no .jpg/.jpeg/.png images"):
    open_source(f"folder:{tmp_path / 'empty'}", "train")


# ----------------------------------------------------------------------------- layout accidents


def test_a_stray_image_in_a_split_folder_does_not_turn_splits_into_classes(tmp_path, caplog):
  """Issue 38, defect 7: one image directly inside train/ made train/ and val/ the classes
  of a single tree (and 'train' its only split). The layout is where most images are;
  the stray image is named in a warning and not read."""
  root = tmp_path / "imgs"
  write_folder(root / "train", {"cat": 3, "dog": 3})
  write_folder(root / "val", {"cat": 1, "dog": 1}, seed=50)
  stray = root / "train" / "IMG_0001.jpg"
  stray.write_bytes(encode(random_image(3)))
  source = open_source(f"folder:{root}", "validation")
  assert source.class_names == ("cat", "dog")
  assert source.split_names == ["train", "val"]
  assert source.num_examples("train") == 6 and source.num_examples("validation") == 2
  assert str(stray) not in [path for path, _ in source.splits["train"]]
  assert any("directly inside split folders are not read" in r.getMessage()
             and "train/IMG_0001.jpg" in r.getMessage() for r in caplog.records)


def test_empty_class_folders_and_nested_images_are_named_in_warnings(tmp_path, caplog):
  root = tmp_path / "pets"
  write_folder(root, {"cat": 2, "dog": 2})
  (root / "emu").mkdir()
  write_folder(root / "dog" / "puppies", {"small": 2})  # dog/puppies/small/img_*.jpg
  write_folder(root / "cat", {"kittens": 1})  # cat/kittens/img_0.jpg
  (root / "loose.jpg").write_bytes(encode(random_image(4)))
  source = open_source(f"folder:{root}", "train")
  assert source.class_names == ("cat", "dog", "emu")  # emu is still a class, with no example
  assert source.num_examples("train") == 4
  messages = [r.getMessage() for r in caplog.records]
  assert any("Class folder(s) without" in m and m.endswith("emu. Each is still a class (a label) "
                                                             "but has no example here.")
             for m in messages), messages
  assert any("nested inside class folders" in m and "cat/kittens/img_0.jpg" in m
             for m in messages), messages
  assert any("directly inside it are not read" in m and "loose.jpg" in m for m in messages)


@pytest.mark.parametrize("make, match", [
    (lambda tmp: "", "names no folder: write 'folder:<path>'"),
    (lambda tmp: "  ", "names no folder"),
    (lambda tmp: str(_one_image(tmp)), "is a file, not a folder"),
    (lambda tmp: str(tmp / "missing"), "does not exist"),
])
def test_folder_names_that_are_not_folders_say_what_is_wrong(tmp_path, make, match):
  """`folder:` with an empty path read the current directory; a file's path said that
  it did not exist."""
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    open_source(f"folder:{make(tmp_path)}", "train")


def _one_image(tmp_path):
  path = tmp_path / "photo.jpg"
  path.write_bytes(encode(random_image(5)))
  return path


def test_as_many_images_at_either_depth_is_an_error_naming_some(tmp_path):
  root = tmp_path / "mixed"
  write_folder(root, {"a": 2})  # a/img_0.jpg, a/img_1.jpg
  write_folder(root / "b", {"x": 2})  # b/x/img_0.jpg, b/x/img_1.jpg
  with pytest.raises(ValueError, match=r"as many images directly in its sub-folders \(2, e\.g\. "
                                       r"a/img_0\.jpg, a/img_1\.jpg\) as one level deeper \(2\)"):
    open_source(f"folder:{root}", "train")
