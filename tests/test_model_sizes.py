"""Parameter counts and FLOPs against the paper's published figures."""

import pytest

from nfnets_jax import models
from nfnets_jax.models import nfnet

# Paper, Table 1/Appendix: params (millions) and FLOPs (billions of
# multiply-adds) at each variant's test resolution.
PUBLISHED = {
    "F0": (71.5, 12.38), "F1": (132.6, 35.54), "F2": (193.8, 62.59), "F3": (254.9, 114.76),
    "F4": (316.1, 215.24), "F5": (377.2, 289.76), "F6": (438.4, 377.28),
}


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_nfnet_params_and_flops_match_paper(variant):
  params_m, flops_b = PUBLISHED[variant]
  size = nfnet.VARIANTS[variant]["test_imsize"]
  assert models.count_params(f"nfnet:{variant}") / 1e6 == pytest.approx(params_m, rel=1e-3)
  assert models.count_flops(f"nfnet:{variant}", size, size)[1] / 1e9 == pytest.approx(flops_b, rel=1e-3)


def test_flops_count_by_hand_for_a_single_conv():
  conv = models.ConvSpec("c", in_ch=8, out_ch=16, kernel=3, stride=2, groups=2)
  # SAME padding: ceil(7/2) = 4 output rows and columns; 3*3*(8/2) MACs per output.
  assert conv.macs(7, 7) == 4 * 4 * 16 * 3 * 3 * 4


@pytest.mark.parametrize("name", models.list_models(published_only=True))
def test_every_published_variant_has_a_consistent_plan(name):
  """Every variant resolves, and the plan's analytic parameter count per conv
  agrees with the group structure (widths divisible by groups)."""
  plan = models.model_plan(name)
  assert plan.blocks and plan.num_classes == 1000
  for block in plan.blocks:
    assert block.width % block.groups == 0
  assert models.count_flops(name, 224, 224)[1] > 0


def test_plus_variants_are_wider():
  assert models.count_params("nfnet:F0+") > 1.5 * models.count_params("nfnet:F0")
