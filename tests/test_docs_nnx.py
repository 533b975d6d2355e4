"""The README's "Using NFNets from Flax NNX" example runs as written, in a subprocess.

`pretrained("nfnet:F0")` is served by the real loader from its cache
(`$NFNETS_JAX_HOME/F0_safe.npz`, offline), as `test_pretrained.py` serves
`--checkpoint=published:F0`: the download itself cannot be mirrored here, since
the pinned checksum is that of the real file. The weights are the reference
rebuild of the published F0 tree.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("flax", reason="the NNX example needs the flax extra (pip install -e .[flax])")

from nfnets_jax import weights  # noqa: E402
from reference_data import param_trees, rebuild_params  # noqa: E402

REPO = pathlib.Path(__file__).parents[1]
SECTION = (REPO / "README.md").read_text().split("## Using NFNets from Flax NNX", 1)[-1]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION.split("\n## ", 1)[0], flags=re.S)


def test_readme_has_one_nnx_example():
  assert len(BLOCKS) == 1 and 'nfnets_nnx.pretrained("nfnet:F0"' in BLOCKS[0]


@pytest.mark.slow
def test_readme_nnx_example_fine_tunes_the_pretrained_head(tmp_path):
  cache = tmp_path / "cache"
  weights.save_params_npz(rebuild_params(param_trees()["nfnet:F0"]), cache / "F0_safe.npz")
  env = {**os.environ, "NFNETS_JAX_HOME": str(cache), "NFNETS_JAX_OFFLINE": "1"}
  proc = subprocess.run([sys.executable, "-c", BLOCKS[0]], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  losses = [float(x) for x in re.findall(r"^loss: (\d+\.\d+)$", proc.stdout, flags=re.M)]
  assert len(losses) == 3, proc.stdout
  assert losses[-1] < losses[0], losses  # the head learns the batch
