"""SAM inside a `shard_map` data-parallel step and the NFNet optimizer on
sharded/replicated arrays, on 4 CPU devices (tests/multidevice_script.py runs
in a fresh interpreter because the device count is fixed at `import jax`)."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import optim_reference as ref

SCRIPT = pathlib.Path(__file__).with_name("multidevice_script.py")
DEVICES, PER_DEVICE, RHO, ASCENT = 4, 5, 0.1, 2  # ceil(0.4 * 5) = 2 ascent examples


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  path = tmp_path_factory.mktemp("multidevice") / "results.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  repo = str(pathlib.Path(__file__).parents[1])
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
  proc = subprocess.run(
      [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning",
       str(SCRIPT), str(path)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(path) as data:
    return dict(data)


def _grad(w, b, x, y):
  r = x.astype(np.float64) @ w + b - y
  return x.T @ r / len(y), np.mean(r)


def _local_sam(r, d):
  """(perturbation, gradient at the perturbed point) of device d, float64."""
  w, b = r["sam_w"].astype(np.float64), float(r["sam_b"])
  x = r["sam_x"][d * PER_DEVICE:(d + 1) * PER_DEVICE].astype(np.float64)
  y = r["sam_y"][d * PER_DEVICE:(d + 1) * PER_DEVICE].astype(np.float64)
  gw, gb = _grad(w, b, x[:ASCENT], y[:ASCENT])
  norm = np.sqrt(np.sum(gw ** 2) + gb ** 2)
  ew, eb = RHO * gw / norm, RHO * gb / norm
  return (ew, eb), _grad(w + ew, b + eb, x, y)


@pytest.mark.slow
@pytest.mark.parametrize("tag,reduction", [("novma", "mean"), ("vma", "sum"),
                                           ("vma_meanloss", "mean")])
def test_sam_ascent_is_per_device_and_descent_is_reduced_like_a_plain_gradient(
    results, tag, reduction):
  """`novma`: shard_map(check_vma=False), the caller pmeans local gradients.
  `vma`: shard_map's default, where JAX itself sums the gradients of
  replicated parameters; SAM must then be summed the same way, no more.
  `vma_meanloss`: the default again, with the loss pmean-ed across devices,
  which turns JAX's sum into the mean."""
  local = [_local_sam(results, d) for d in range(DEVICES)]
  eps_w = np.stack([e[0] for e, _ in local])
  eps_b = np.array([e[1] for e, _ in local])
  np.testing.assert_allclose(results[f"{tag}_eps_w"], eps_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(results[f"{tag}_eps_b"], eps_b, rtol=1e-5, atol=1e-7)
  # Each device climbs its own way: the ascent gradient was never reduced.
  for d in range(1, DEVICES):
    assert not np.allclose(eps_w[d], eps_w[0], atol=1e-3)
  # The compiled SAM step has no more all-reduces than the plain step (the
  # ascent loss's own pmean, if any, is dead code: only its gradient is used).
  assert results[f"{tag}_allreduce_sam"] == results[f"{tag}_allreduce_plain"]

  combine = np.mean if reduction == "mean" else np.sum
  np.testing.assert_allclose(results[f"{tag}_sam_w"], combine([g[0] for _, g in local], 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results[f"{tag}_sam_b"], combine([g[1] for _, g in local]),
                             rtol=1e-5, atol=1e-6)
  w, b = results["sam_w"].astype(np.float64), float(results["sam_b"])
  plain_w, plain_b = _grad(w, b, results["sam_x"], results["sam_y"])
  scale = 1 if reduction == "mean" else DEVICES
  np.testing.assert_allclose(results[f"{tag}_plain_w"], scale * plain_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results[f"{tag}_plain_b"], scale * plain_b, rtol=1e-5, atol=1e-6)


def _tree(results, prefix):
  tree = {}
  for key, value in results.items():
    if key.startswith(prefix + "|"):
      _, module, name = key.split("|")
      tree.setdefault(module, {})[name] = value
  return tree


@pytest.mark.slow
def test_optimizer_on_sharded_and_replicated_params(results):
  params = _tree(results, "opt_param")
  grads_seq = [_tree(results, f"opt_grad{i}") for i in range(3)]
  expected, fractions = ref.nfnet_steps(
      params, grads_seq, lambda t: ref.warmup_cosine(t, 0.2, 1, 4), momentum=0.9,
      nesterov=True, weight_decay=0.05, clipping=0.02, eps=1e-3)
  final = _tree(results, "opt_final")
  assert final.keys() == expected.keys()
  for module, leaves in expected.items():
    for name, value in leaves.items():
      np.testing.assert_allclose(final[module][name], value, rtol=2e-5, atol=1e-7,
                                 err_msg=f"{module}/{name}")
  np.testing.assert_allclose(results["opt_fractions"], fractions, rtol=1e-6)
  assert bool(results["opt_conv_w_spec_kept"])
