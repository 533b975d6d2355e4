"""The NNX examples run as written, each in a fresh interpreter: the README's
"Using NFNets from Flax NNX" snippet and docs/models.md's head fine-tuning.

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

pytest.importorskip("flax", reason="the NNX examples need the flax extra (pip install -e .[flax])")

from nfnets_jax import models, weights  # noqa: E402
from reference_data import param_trees, rebuild_params  # noqa: E402

REPO = pathlib.Path(__file__).parents[1]


def _blocks(path: pathlib.Path, heading: str) -> list[str]:
  section = path.read_text().split(heading, 1)[-1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


README = _blocks(REPO / "README.md", "## Using NFNets from Flax NNX")
DOCS = _blocks(REPO / "docs" / "models.md", "## Flax NNX")


def test_each_nnx_section_has_one_example_with_the_pretrained_f0():
  assert len(README) == len(DOCS) == 1
  assert all('nfnets_nnx.pretrained("nfnet:F0"' in block for block in README + DOCS)


def _run_offline(code: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
  cache = tmp_path / "cache"
  weights.save_params_npz(rebuild_params(param_trees()["nfnet:F0"]), cache / "F0_safe.npz")
  env = {**os.environ, "NFNETS_JAX_HOME": str(cache), "NFNETS_JAX_OFFLINE": "1"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.slow
def test_readme_nnx_example_loads_the_pretrained_module(tmp_path):
  check = ("\nassert isinstance(model, nnx.Module) and model.num_classes == 1000"
           "\nprint(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))")
  proc = _run_offline("import jax\n" + README[0] + check, tmp_path)
  assert int(proc.stdout.strip()) == models.count_params("nfnet:F0"), proc.stdout


@pytest.mark.slow
def test_docs_nnx_example_fine_tunes_the_pretrained_head(tmp_path):
  proc = _run_offline(DOCS[0], tmp_path)
  losses = [float(x) for x in re.findall(r"^loss: (\d+\.\d+)$", proc.stdout, flags=re.M)]
  assert len(losses) == 3, proc.stdout
  assert losses[-1] < losses[0], losses  # the head learns the batch
