"""Checkpoint loading: published pickles (restricted unpickling unless trusted), the safe .npz,
orbax directories and training workdirs, and shape validation."""

import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import dill
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nfnets_jax import models, weights
from reference_data import golden_outputs, param_trees, rebuild_params

REPO = pathlib.Path(__file__).resolve().parent.parent


def _reference_params(name: str) -> dict:
  """Deterministic parameters for any model, by the reference data's rule."""
  shapes = models.param_shapes(name)
  return rebuild_params({m: {n: list(leaf.shape) for n, leaf in group.items()}
                         for m, group in shapes.items()})


@pytest.fixture(scope="module")
def nano():
  return _reference_params("nfnet:nano")


def _assert_identical(actual, expected):
  """Same modules, names, dtypes, shapes and bits."""
  assert sorted(actual) == sorted(expected)
  for module in expected:
    assert sorted(actual[module]) == sorted(expected[module]), module
    for name, value in expected[module].items():
      got = actual[module][name]
      assert isinstance(got, np.ndarray), (module, name, type(got))
      assert got.dtype == value.dtype and got.shape == value.shape, (module, name)
      assert got.tobytes() == np.asarray(value).tobytes(), (module, name)


def _write_published(params, path):
  """The published files' format: a dill pickle of {module: {name: array}}."""
  with open(path, "wb") as f:
    dill.dump(params, f)
  return path


@pytest.mark.slow
def test_published_pickle_loads_without_trust_and_reproduces_golden_logits(tmp_path):
  """The published format (a dill pickle of plain arrays) needs no trust flag."""
  params = rebuild_params(param_trees()["nfnet:F0"])
  path = _write_published(params, tmp_path / "F0_haiku.npz")

  loaded = weights.load_params(path, model="nfnet:F0")
  _assert_identical(loaded, params)
  _assert_identical(weights.load_params(path, trust_pickle=True), params)
  golden = golden_outputs()
  model = models.transform("nfnet:F0")
  logits = jax.jit(lambda p, x: model.apply(p, None, x, is_training=False)["logits"])(
      loaded, golden["input"])
  expected = golden["nfnet:F0:logits"]
  error = np.max(np.abs(np.asarray(logits) - expected)) / np.max(np.abs(expected))
  assert error <= 1e-4, error


class _RunsCode:
  """Pickles as a call of `print`: harmless, but a function no parameter file holds."""

  def __reduce__(self):
    return (print, ("unpickled",))


def test_pickle_naming_code_is_refused_unless_trusted(tmp_path, nano, capfd):
  path = tmp_path / "weights.pkl"
  tree = {m: dict(g) for m, g in nano.items()}
  tree["NFNet/~/linear"]["extra"] = _RunsCode()
  with open(path, "wb") as f:
    dill.dump(tree, f)
  with pytest.raises(weights.UntrustedPickleError) as err:
    weights.load_params(path)
  message = str(err.value)
  assert "builtins.print" in message and "not a plain parameter file" in message
  assert "trust_pickle=True" in message and str(path) in message
  assert (err.value.module, err.value.name) == ("builtins", "print")
  assert "unpickled" not in capfd.readouterr().out
  # Trusted, dill runs it (and the tree is then not all arrays).
  weights.load_params(path, trust_pickle=True)
  assert "unpickled" in capfd.readouterr().out


def test_plain_pickle_and_suffix_do_not_matter(tmp_path, nano):
  """Formats are recognised by content: a plain-pickle file named .pkl loads too."""
  path = tmp_path / "weights.pkl"
  with open(path, "wb") as f:
    pickle.dump(nano, f, protocol=4)
  _assert_identical(weights.load_params(path), nano)
  _assert_identical(weights.load_params(path, trust_pickle=True), nano)
  # And the safe format under a misleading name is still read as the safe format.
  safe = weights.save_params_npz(nano, tmp_path / "weights.npz")
  renamed = tmp_path / "weights.pkl.bin"
  os.replace(safe, renamed)
  _assert_identical(weights.load_params(renamed, model="nfnet:nano"), nano)


def test_safe_npz_round_trip_is_bitwise(tmp_path, nano):
  path = weights.save_params_npz(nano, tmp_path / "nano.npz")
  with np.load(path, allow_pickle=False) as data:
    assert "NFNet/~/nf_block/~/conv1/w" in data.files  # Flat 'module/name' keys.
  _assert_identical(weights.load_params(path, model="nfnet:nano"), nano)
  with pytest.raises(FileExistsError, match="overwrite"):
    weights.save_params_npz(nano, path, overwrite=False)
  with pytest.raises(ValueError, match=r"\.npz"):
    weights.save_params_npz(nano, tmp_path / "nano.weights")


def test_npz_with_pickled_objects_is_refused(tmp_path):
  path = tmp_path / "evil.npz"
  np.savez(path, **{"NFNet/~/linear/w": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(ValueError, match="pickled objects"):
    weights.load_params(path)


def test_orbax_directory_round_trip(tmp_path, nano):
  path = weights.save_params_orbax(nano, tmp_path / "orbax_params")
  _assert_identical(weights.load_params(path, model="nfnet:nano"), nano)
  with pytest.raises(ValueError, match="no EMA"):
    weights.load_params(path, ema=True)
  with pytest.raises(FileExistsError, match="overwrite"):
    weights.save_params_orbax(nano, path)


def _scaled(params, factor):
  return {m: {n: (v * np.float32(factor)).astype(v.dtype) for n, v in g.items()}
          for m, g in params.items()}


def test_training_workdir_latest_step_ema_and_explicit_step(tmp_path, nano):
  """A workdir written the way the contract in checkpoint.py describes."""
  workdir = tmp_path / "workdir"
  saved = {}
  with weights.checkpoint_manager(workdir) as manager:
    for step in (100, 200):
      params, ema = _scaled(nano, step), _scaled(nano, -step)
      opt_state = {"momentum": np.full((3,), step, np.float32)}
      manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          ema_params=ocp.args.StandardSave(ema),
          opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave({"step": step, "model": "nfnet:nano"})))
      saved[step] = (params, ema)
    manager.wait_until_finished()
  assert (workdir / "checkpoints" / "200" / "ema_params").is_dir()

  _assert_identical(weights.load_params(workdir, model="nfnet:nano"), saved[200][0])
  _assert_identical(weights.load_params(workdir, ema=True), saved[200][1])
  _assert_identical(weights.load_params(workdir, step=100), saved[100][0])
  _assert_identical(weights.load_params(workdir / "checkpoints" / "100", ema=True),
                    saved[100][1])
  with pytest.raises(ValueError, match=r"no step 150; saved steps: \[100, 200\]"):
    weights.load_params(workdir, step=150)

  # load_meta reads the same layout the same way.
  meta = {"step": 200, "model": "nfnet:nano"}
  assert weights.load_meta(workdir) == meta
  assert weights.load_meta(workdir / "checkpoints") == meta
  assert weights.load_meta(workdir, step=100) == {**meta, "step": 100}
  assert weights.load_meta(workdir / "checkpoints" / "100") == {**meta, "step": 100}
  with pytest.raises(ValueError, match=r"no step 150; saved steps: \[100, 200\]"):
    weights.load_meta(workdir, step=150)
  for load in (weights.load_params, weights.load_meta):
    with pytest.raises(ValueError, match="single step directory; step= applies to workdirs"):
      load(workdir / "checkpoints" / "100", step=100)


def test_workdir_without_ema_or_steps_says_so(tmp_path, nano):
  workdir = tmp_path / "workdir"
  with weights.checkpoint_manager(workdir) as manager:
    with pytest.raises(FileNotFoundError, match="no finished checkpoint step"):
      weights.load_params(workdir)
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(nano)))
    manager.wait_until_finished()
  with pytest.raises(ValueError, match="no 'ema_params' item.*it has: params"):
    weights.load_params(workdir, ema=True)


def test_load_meta_is_none_where_no_step_records_one_and_refuses_what_is_not_a_checkpoint(
    tmp_path, nano):
  workdir = tmp_path / "workdir"
  with weights.checkpoint_manager(workdir) as manager:
    with pytest.raises(FileNotFoundError, match="no finished checkpoint step"):
      weights.load_meta(workdir)
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(nano)))
    manager.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(nano),
                                            meta=ocp.args.JsonSave(["not", "an", "object"])))
    manager.wait_until_finished()
  assert weights.load_meta(workdir, step=1) is None  # saved without a meta item
  with pytest.raises(ValueError, match=r"\(step 2\): the 'meta' item holds a list, not a JSON "):
    weights.load_meta(workdir)
  with pytest.raises(ValueError, match="the 'meta' item holds a list"):
    weights.load_meta(workdir / "checkpoints" / "2")
  assert weights.load_meta(weights.save_params_orbax(nano, tmp_path / "tree")) is None
  assert weights.load_meta(weights.save_params_npz(nano, tmp_path / "p.npz")) is None
  (tmp_path / "empty").mkdir()
  assert weights.load_meta(tmp_path / "empty") is None
  with pytest.raises(FileNotFoundError, match="nowhere"):
    weights.load_meta(tmp_path / "nowhere")


def test_shape_mismatch_lists_offending_parameters(tmp_path, nano):
  bad = {m: dict(g) for m, g in nano.items()}
  bad["NFNet/~/final_conv"]["w"] = np.zeros((1, 1, 128, 100), np.float32)
  del bad["NFNet/~/nf_block_2/~/conv1b"]["gain"]
  bad["NFNet/~/extra"] = {"w": np.zeros((2, 3), np.float32)}
  path = weights.save_params_npz(bad, tmp_path / "bad.npz")
  with pytest.raises(weights.ParameterMismatchError) as err:
    weights.load_params(path, model="nfnet:nano")
  message = str(err.value)
  final_w = models.param_shapes("nfnet:nano")["NFNet/~/final_conv"]["w"].shape
  assert f"NFNet/~/final_conv/w: checkpoint (1, 1, 128, 100), model {final_w}" in message
  gain = models.param_shapes("nfnet:nano")["NFNet/~/nf_block_2/~/conv1b"]["gain"].shape
  assert f"NFNet/~/nf_block_2/~/conv1b/gain {gain}" in message
  assert "NFNet/~/extra/w (2, 3)" in message
  assert [name for name, _ in err.value.missing] == ["NFNet/~/nf_block_2/~/conv1b/gain"]
  assert [name for name, _ in err.value.unexpected] == ["NFNet/~/extra/w"]
  assert [name for name, *_ in err.value.mismatched] == ["NFNet/~/final_conv/w"]


def test_num_classes_is_read_from_checkpoint_or_checked(tmp_path):
  ten = rebuild_params({m: {n: list(leaf.shape) for n, leaf in g.items()}
                        for m, g in models.param_shapes("nfnet:nano", 10).items()})
  path = weights.save_params_npz(ten, tmp_path / "ten.npz")
  weights.load_params(path, model="nfnet:nano")  # 10 classes, inferred.
  with pytest.raises(weights.ParameterMismatchError, match=r"NFNet/~/linear/b: checkpoint "
                     r"\(10,\), model \(1000,\)"):
    weights.load_params(path, model="nfnet:nano", num_classes=1000)


def test_missing_and_unrecognised_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing_here.npz"):
    weights.load_params(tmp_path / "nothing_here.npz")
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a checkpoint at all")
  with pytest.raises(ValueError, match="Cannot tell what"):
    weights.load_params(junk)
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  with pytest.raises(ValueError, match="neither a training workdir"):
    weights.load_params(empty)
  with pytest.raises(ValueError, match="ema= and step= apply only"):
    weights.load_params(junk, ema=True)
  # PyTorch's .pth is a zip too; np.load would hand back its raw bytes as "arrays".
  torch_like = tmp_path / "model.pth"
  with zipfile.ZipFile(torch_like, "w") as archive:
    archive.writestr("archive/data.pkl", b"\x80\x04N.")
    archive.writestr("archive/data/0", b"\x00" * 8)
  with pytest.raises(ValueError, match="PyTorch checkpoint.*--from_timm="):
    weights.load_params(torch_like)


def test_safetensors_input_points_to_timm_conversion(tmp_path):
  from safetensors.numpy import save_file
  path = tmp_path / "dm_nfnet_f0.safetensors"
  save_file({"stem.conv1.weight": np.zeros((16, 3, 3, 3), np.float32)}, str(path))
  with pytest.raises(ValueError, match="--from_timm="):
    weights.load_params(path)


@pytest.mark.slow
def test_cli_converts_published_pickle_to_safe_npz(tmp_path, nano):
  src = _write_published(nano, tmp_path / "nano_haiku.npz")
  out = tmp_path / "nano_safe.npz"
  cmd = [sys.executable, "-m", "nfnets_jax.convert", f"--from_pickle={src}", f"--out={out}"]
  env = {**os.environ, "PYTHONPATH": str(REPO)}

  done = subprocess.run(cmd + ["--model=nfnet:nano"], capture_output=True, text=True, env=env,
                        cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert str(out) in done.stdout
  _assert_identical(weights.load_params(out), nano)

  again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
  assert again.returncode == 2 and "--overwrite" in again.stderr

  # A pickle that names code is refused by name, and --out is not written.
  hostile = tmp_path / "hostile.pkl"
  with open(hostile, "wb") as f:
    pickle.dump({"NFNet/~/linear": {"w": _RunsCode()}}, f)
  other = tmp_path / "other.npz"
  refused = subprocess.run(
      [sys.executable, "-m", "nfnets_jax.convert", f"--from_pickle={hostile}", f"--out={other}"],
      capture_output=True, text=True, env=env, cwd=tmp_path)
  assert refused.returncode == 1, refused.stderr  # A bad input file: cli's EXIT_FAILURE.
  assert "builtins.print" in refused.stderr and "trust_pickle" in refused.stderr
  assert "unpickled" not in refused.stdout and not other.exists()
