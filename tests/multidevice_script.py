"""Runs SAM and the NFNet optimizer on 4 CPU devices; driven by test_multidevice.py.

JAX fixes its device count at import, so this runs in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=4 set before `import jax`.
Writes its results (no verdicts: the test compares them with NumPy oracles) as
an .npz file to the path given as the only argument.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optim_reference as ref  # noqa: E402
from nfnets_jax.optim import (agc_clip_fraction, nfnet_lr_schedule, nfnet_optimizer,  # noqa: E402
                              sam_grad, sam_perturbation)

DEVICES = 4
PER_DEVICE = 5
RHO, FRACTION = 0.1, 0.4  # 2 ascent examples out of 5 per device
SHARDED = {  # module -> leaf -> spec; everything else is replicated
    ref.CONV: {"w": P(None, None, None, "data")},  # split over output units
    "NFNet/~/stem_conv0": {"w": P(None, None, None, "data")},
    # split over the reduced (input) axis: AGC's norms need a cross-device sum
    "NFNet/~/nf_block_0/~/squeeze_excite/~/linear": {"w": P("data", None)},
    "NFNet/~/linear": {"w": P("data", None)},
}


def loss_fn(params, batch):
  r = batch["x"] @ params["w"] + params["b"] - batch["y"]
  loss = 0.5 * jnp.mean(r ** 2)
  return loss, {"loss": loss}


def mean_loss_fn(params, batch):
  """The loss averaged over devices, the way to get mean gradients from
  shard_map's default (check_vma=True) sum of replicated-parameter gradients."""
  loss, aux = loss_fn(params, batch)
  return jax.lax.pmean(loss, "data"), aux


def count_all_reduces(fn, *args) -> int:
  return fn.lower(*args).compile().as_text().count("all-reduce(")


def sam_results(mesh, out):
  rng = np.random.default_rng(0)
  n = DEVICES * PER_DEVICE
  x = rng.standard_normal((n, 3)).astype(np.float32)
  y = rng.standard_normal(n).astype(np.float32)
  params = {"w": rng.standard_normal(3).astype(np.float32), "b": np.float32(0.3)}
  out.update(sam_x=x, sam_y=y, sam_w=params["w"], sam_b=params["b"])
  replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = jax.device_put(params, replicated)
  batch = jax.device_put({"x": x, "y": y}, by_example)

  for tag, check_vma, loss in (("novma", False, loss_fn), ("vma", True, loss_fn),
                               ("vma_meanloss", True, mean_loss_fn)):

    def sam_step(params, batch, loss=loss):
      grads, _ = sam_grad(loss, rho=RHO, ascent_fraction=FRACTION)(params, batch)
      return jax.lax.pmean(grads, "data")  # the caller's usual reduction

    def plain_step(params, batch, loss=loss):
      grads, _ = jax.grad(loss, has_aux=True)(params, batch)
      return jax.lax.pmean(grads, "data")

    def perturbation(params, batch, loss=loss):
      eps = sam_perturbation(loss, params, batch, rho=RHO, ascent_fraction=FRACTION)
      return jax.tree_util.tree_map(lambda e: e[None], eps)

    smap = lambda f, out_specs: jax.jit(jax.shard_map(
        f, mesh=mesh, in_specs=(P(), P("data")), out_specs=out_specs, check_vma=check_vma))
    sam_fn, plain_fn = smap(sam_step, P()), smap(plain_step, P())
    eps = smap(perturbation, P("data"))(params, batch)
    grads, plain = sam_fn(params, batch), plain_fn(params, batch)
    out[f"{tag}_eps_w"], out[f"{tag}_eps_b"] = np.asarray(eps["w"]), np.asarray(eps["b"])
    out[f"{tag}_sam_w"], out[f"{tag}_sam_b"] = np.asarray(grads["w"]), np.asarray(grads["b"])
    out[f"{tag}_plain_w"], out[f"{tag}_plain_b"] = np.asarray(plain["w"]), np.asarray(plain["b"])
    out[f"{tag}_allreduce_sam"] = count_all_reduces(sam_fn, params, batch)
    out[f"{tag}_allreduce_plain"] = count_all_reduces(plain_fn, params, batch)


def optimizer_results(mesh, out):
  rng = np.random.default_rng(1)
  params = ref.haiku_tree(rng)
  grads_seq = [ref.random_grads(rng, params) for _ in range(3)]
  for prefix, tree in [("opt_param", params)] + [(f"opt_grad{i}", g)
                                                   for i, g in enumerate(grads_seq)]:
    for module, leaves in tree.items():
      for name, value in leaves.items():
        out[f"{prefix}|{module}|{name}"] = value

  def shard(tree):
    return {m: {n: jax.device_put(a, NamedSharding(mesh, SHARDED.get(m, {}).get(n, P())))
                for n, a in d.items()} for m, d in tree.items()}

  opt = nfnet_optimizer(nfnet_lr_schedule(0.1, batch_size=512, total_steps=4, warmup_steps=1),
                        weight_decay=0.05, clipping=0.02, record_clip_fraction=True)

  @jax.jit
  def step(grads, state, params):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = shard(params)
  state = opt.init(params)
  fractions = []
  for grads in grads_seq:
    params, state = step(shard(grads), state, params)
    fractions.append(float(agc_clip_fraction(state)))
  out["opt_fractions"] = np.asarray(fractions)
  for module, leaves in params.items():
    for name, p in leaves.items():
      out[f"opt_final|{module}|{name}"] = np.asarray(p)
  conv_w = params[ref.CONV]["w"]
  out["opt_conv_w_spec_kept"] = conv_w.sharding.is_equivalent_to(
      NamedSharding(mesh, SHARDED[ref.CONV]["w"]), conv_w.ndim)


def main(path):
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  out = {}
  sam_results(mesh, out)
  optimizer_results(mesh, out)
  np.savez(path, **out)


if __name__ == "__main__":
  main(sys.argv[1])
