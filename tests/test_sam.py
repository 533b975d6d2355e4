"""SAM gradients on a least-squares loss, whose gradient has a closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.optim import ascent_batch_size, sam_grad, sam_perturbation

N, D = 10, 5


def loss_fn(params, batch, scale=1.0):
  r = batch["x"] @ params["lin"]["w"] + params["lin"]["b"] - batch["y"]
  loss = scale * 0.5 * jnp.mean(r.astype(jnp.float32) ** 2)
  return loss, {"loss": loss}


def np_grad(w, b, x, y, scale=1.0):
  r = x @ w + b - y
  return scale * x.T @ r / len(y), scale * np.mean(r)


def np_sam(w, b, x, y, rho, k, scale=1.0):
  gw, gb = np_grad(w, b, x[:k], y[:k], scale)
  norm = np.sqrt(np.sum(gw ** 2) + gb ** 2)
  ew, eb = (rho * gw / norm, rho * gb / norm) if norm > 0 else (0 * gw, 0 * gb)
  return np_grad(w + ew, b + eb, x, y, scale), (ew, eb)


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x, y = rng.standard_normal((N, D)), rng.standard_normal(N)
  w, b = rng.standard_normal(D), rng.standard_normal()
  params = {"lin": {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  return (w, b, x, y), params, batch


def _global_norm(tree):
  return np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64)))
                     for v in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize("rho,fraction", [(0.05, 0.2), (0.5, 0.5), (0.3, 1.0)])
def test_matches_closed_form(rho, fraction):
  (w, b, x, y), params, batch = _problem()
  grads, aux = jax.jit(sam_grad(loss_fn, rho=rho, ascent_fraction=fraction))(params, batch)
  k = int(np.ceil(fraction * N))
  (gw, gb), (ew, eb) = np_sam(w, b, x, y, rho, k)
  np.testing.assert_allclose(grads["lin"]["w"], gw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads["lin"]["b"], gb, rtol=1e-5, atol=1e-6)
  # aux comes from the perturbed, full-batch evaluation.
  r = x @ (w + ew) + (b + eb) - y
  np.testing.assert_allclose(aux["loss"], 0.5 * np.mean(r ** 2), rtol=1e-5)
  eps = sam_perturbation(loss_fn, params, batch, rho=rho, ascent_fraction=fraction)
  np.testing.assert_allclose(_global_norm(eps), rho, rtol=1e-5)
  # The perturbation moved the gradient: this is not the plain one.
  assert not np.allclose(gw, np_grad(w, b, x, y)[0], rtol=1e-3)


def test_extra_args_reach_both_passes():
  (w, b, x, y), params, batch = _problem(1)
  grads, _ = sam_grad(loss_fn, rho=0.1, ascent_fraction=0.3)(params, batch, 3.0)
  (gw, gb), _ = np_sam(w, b, x, y, 0.1, 3, scale=3.0)
  np.testing.assert_allclose(grads["lin"]["w"], gw, rtol=1e-5, atol=1e-6)


def test_rho_zero_is_the_plain_gradient():
  _, params, batch = _problem(2)
  sam, _ = jax.jit(sam_grad(loss_fn, rho=0.0))(params, batch)
  plain, _ = jax.jit(jax.grad(loss_fn, has_aux=True))(params, batch)
  jax.tree_util.tree_map(np.testing.assert_array_equal, sam, plain)


def test_zero_ascent_gradient_gives_no_perturbation():
  (w, b, x, y), params, batch = _problem(3)
  # Targets fitted exactly on the ascent examples: the ascent gradient is 0.
  y = np.asarray(y, np.float32).copy()
  y[:2] = np.asarray(batch["x"][:2] @ params["lin"]["w"] + params["lin"]["b"])
  batch = {"x": batch["x"], "y": jnp.asarray(y)}
  eps = sam_perturbation(loss_fn, params, batch, rho=0.05, ascent_fraction=0.2)
  assert all(np.all(np.asarray(e) == 0) for e in jax.tree_util.tree_leaves(eps))
  grads, _ = sam_grad(loss_fn, rho=0.05, ascent_fraction=0.2)(params, batch)
  plain, _ = jax.grad(loss_fn, has_aux=True)(params, batch)
  jax.tree_util.tree_map(np.testing.assert_array_equal, grads, plain)


def test_bfloat16():
  (w, b, x, y), params, batch = _problem(4)
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
  batch = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), batch)
  grads, _ = jax.jit(sam_grad(loss_fn, rho=0.05))(params, batch)
  assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
  as64 = lambda v: np.asarray(v, np.float64)
  (gw, gb), _ = np_sam(as64(params["lin"]["w"]), as64(params["lin"]["b"]), as64(batch["x"]),
                       as64(batch["y"]), 0.05, 2)
  np.testing.assert_allclose(as64(grads["lin"]["w"]), gw, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("n,fraction,k", [(10, 0.2, 2), (30, 0.1, 3), (3, 0.2, 1), (7, 1.0, 7),
                                          (256, 0.2, 52), (5, 1e-9, 1)])
def test_ascent_batch_size(n, fraction, k):
  assert ascent_batch_size(n, fraction) == k


@pytest.mark.parametrize("kw,message", [
    (dict(rho=-0.1), r"rho must be a finite number >= 0, got -0.1"),
    (dict(rho=float("inf")), r"rho must be a finite number >= 0, got inf"),
    (dict(ascent_fraction=0.0), r"ascent_fraction must be in \(0, 1\], got 0.0"),
    (dict(ascent_fraction=1.5), r"ascent_fraction must be in \(0, 1\], got 1.5"),
])
def test_invalid_arguments(kw, message):
  with pytest.raises(ValueError, match=message):
    sam_grad(loss_fn, **kw)


def test_bad_batches():
  _, params, batch = _problem(5)
  grad_fn = sam_grad(loss_fn)
  with pytest.raises(ValueError, match=r"same leading batch axis.*\(10, 5\).*\(9,\)"):
    grad_fn(params, {"x": batch["x"], "y": batch["y"][:9]})
  with pytest.raises(ValueError, match="batch is empty"):
    grad_fn(params, {"x": batch["x"][:0], "y": batch["y"][:0]})
  with pytest.raises(ValueError, match="no arrays"):
    grad_fn(params, {})
