"""The grouped settings of the input pipeline (`data.options`) and the seam between
`data.build` (grouped) and `data.load` (keywords): same batches, same refusals."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_helpers import digits_data_dir  # noqa: F401
from nfnets_jax import data
from nfnets_jax.data import options

tf = pytest.importorskip("tensorflow")


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype, k
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _take(batches, n):
  return [next(batches) for _ in range(n)]


def test_keyword_and_grouped_forms_give_identical_training_batches(digits_data_dir):
  keywords = dict(image_size=(16, 12), train_preproc="inception_crop", dtype="bfloat16",
                  transpose=True, augment_name="cutmix_mixup_randaugment_405",
                  augment_before_mix=False, seed=3, deterministic=True, start_step=2,
                  process_index=0, process_count=1, shuffle_buffer=50,
                  data_dir=digits_data_dir, download=False, cache=True, num_threads=2,
                  autotune=False)
  loaded = data.load("digits", "train", is_training=True, batch_dims=(2, 4), **keywords)
  built = data.build(
      "digits", "train", is_training=True, batch_dims=(2, 4),
      preprocessing=data.Preprocessing(image_size=(16, 12), train_preproc="inception_crop",
                                       dtype="bfloat16", transpose=True),
      augmentation=data.Augmentation("cutmix_mixup_randaugment_405", augment_before_mix=False),
      stream=data.Stream(seed=3, deterministic=True, start_step=2, process_index=0,
                         process_count=1, shuffle_buffer=50),
      reading=data.Reading(data_dir=digits_data_dir, download=False, cache=True,
                           num_threads=2, autotune=False))
  assert loaded.step == built.step == 2
  a, b = _take(loaded, 3), _take(built, 3)
  assert a[0]["images"].shape == (2, 16, 12, 3, 4) and "ratio" in a[0]
  _assert_same(a, b)
  assert loaded.dataset.options().autotune.enabled is built.dataset.options().autotune.enabled
  # And the groups really reach the pipeline: another seed gives other batches.
  other = data.build("digits", "train", is_training=True, batch_dims=(2, 4),
                     preprocessing=data.Preprocessing(image_size=(16, 12), dtype="bfloat16",
                                                      transpose=True),
                     augmentation=data.Augmentation("cutmix_mixup_randaugment_405",
                                                    augment_before_mix=False),
                     stream=data.Stream(seed=4, start_step=2, shuffle_buffer=50),
                     reading=data.Reading(data_dir=digits_data_dir))
  assert not np.array_equal(next(other)["images"], a[0]["images"])


def test_keyword_and_grouped_forms_give_identical_evaluation_batches(digits_data_dir):
  loaded = list(data.load("digits", "test", is_training=False, batch_dims=(16,), image_size=20,
                          eval_preproc="resize_crop_0.875", data_dir=digits_data_dir))
  built = list(data.build("digits", "test", is_training=False, batch_dims=(16,),
                          preprocessing=data.Preprocessing(20, eval_preproc="resize_crop_0.875"),
                          reading=data.Reading(data_dir=digits_data_dir)))
  _assert_same(loaded, built)
  assert "mask" in loaded[0]


def test_load_keywords_are_the_group_fields_each_in_one_group():
  defaults = {"preprocessing": data.Preprocessing(8), "augmentation": data.Augmentation(),
              "stream": data.Stream(), "reading": data.Reading()}
  assert list(defaults) == list(options.GROUPS)
  fields = [(f.name, getattr(group, f.name)) for group in defaults.values()
            for f in dataclasses.fields(group)]
  assert len(dict(fields)) == len(fields) == 25  # no name in two groups
  assert options.group_keywords(**dict(fields)) == defaults
  assert options.group_keywords(image_size=8, seed=1, cache=True) == {
      **defaults, "stream": data.Stream(seed=1), "reading": data.Reading(cache=True)}


def test_groups_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    data.Stream().seed = 1


@pytest.mark.parametrize("make, match", [
    (lambda: data.Preprocessing(0), "image_size.*0"),
    (lambda: data.Preprocessing(8, eval_preproc="centre"), "'centre'.*crop_resize"),
    (lambda: data.Preprocessing(8, train_preproc="crop"), r"'crop'.*inception_crop, resize"),
    (lambda: data.Preprocessing(8, dtype="int8"), "dtype.*floating.*'int8'"),
    (lambda: data.Preprocessing(8, normalization="timm"),
     "Unknown normalization 'timm'; valid: imagenet, inception"),
    (lambda: data.Augmentation("mixup_autoaugment"), "autoaugment"),
    (lambda: data.Augmentation("mixup", mix_source="pairs"), "'pairs'; valid: 'stream', 'batch'"),
    (lambda: data.Stream(seed="0"), "seed must be an int or None, got '0'"),
    (lambda: data.Stream(seed=True), "seed must be an int or None, got True"),
    (lambda: data.Stream(start_step=-1), "start_step must be an int >= 0, got -1"),
    (lambda: data.Stream(shuffle_buffer=0), "shuffle_buffer must be None or an int >= 1, got 0"),
    (lambda: data.Reading(num_threads=0), "num_threads must be None or an int >= 1, got 0"),
    (lambda: data.Reading(val_fraction=-0.1), r"val_fraction must be a number in \[0, 1\).*-0.1"),
    (lambda: data.Reading(classes="5-x"), "'5-x' is not a class index or a range"),
    (lambda: data.Reading(examples_per_class=0),
     "examples_per_class must be None .every example. or an int >= 1, got 0"),
])
def test_a_group_refuses_a_bad_field_when_made(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bfloat16_is_understood_by_name_and_by_type():
  import jax.numpy as jnp
  assert data.Preprocessing(8, dtype="bfloat16").dtype == "bfloat16"
  assert options.image_dtype(jnp.bfloat16).name == "bfloat16"
  assert options.image_dtype(np.float16) == np.float16


def test_unknown_keyword_and_wrong_group_type_are_type_errors():
  with pytest.raises(TypeError, match=r"'augmnet_name'.*valid: image_size, .*augment_name"):
    data.load("digits", "train", is_training=True, batch_dims=(2,), image_size=8,
              augmnet_name="mixup", fake_data=True)
  with pytest.raises(TypeError, match=r"stream must be a data.Stream, got dict \{'seed': 0\}"):
    data.build("digits", "train", is_training=True, batch_dims=(2,),
               preprocessing=data.Preprocessing(8), stream={"seed": 0},
               reading=data.Reading(fake_data=True))


def test_checks_across_groups_stay_with_build():
  fake = data.Reading(fake_data=True)
  with pytest.raises(ValueError, match="innermost batch dimension must be even"):
    data.build("digits", "train", is_training=True, batch_dims=(3,),
               preprocessing=data.Preprocessing(8), augmentation=data.Augmentation("mixup_cutmix"),
               reading=fake)
  with pytest.raises(ValueError, match="needs a seed"):
    data.build("digits", "train", is_training=True, batch_dims=(2,),
               preprocessing=data.Preprocessing(8), stream=data.Stream(deterministic=True),
               reading=fake)
  with pytest.raises(ValueError, match="start_step only applies to training"):
    data.build("digits", "test", is_training=False, batch_dims=(2,),
               preprocessing=data.Preprocessing(8), stream=data.Stream(start_step=1),
               reading=fake)


@pytest.mark.slow  # a subprocess
def test_settings_import_without_tensorflow():
  probe = ("import json, sys\n"
           "from nfnets_jax.data import Augmentation, Preprocessing, Reading, Stream\n"
           "Preprocessing(8, dtype='bfloat16'); Augmentation('mixup'); Stream(seed=0); Reading()\n"
           "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')))")
  proc = subprocess.run([sys.executable, "-c", probe], cwd=pathlib.Path(__file__).parents[1],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
