"""The README's "Using AGC in your own project" example and docs/models.md's full NFNet
recipe run as written."""

import contextlib
import io
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).parents[1]
DOC = REPO / "README.md"
SECTION = DOC.read_text().split("## Using AGC in your own project", 1)[-1].split("\n## ", 1)[0]
RECIPE = (REPO / "docs" / "models.md").read_text().split("## The full NFNet recipe", 1)[-1]
BLOCKS = (re.findall(r"```python\n(.*?)```", SECTION, flags=re.S)
          + re.findall(r"```python\n(.*?)```", RECIPE.split("\n## ", 1)[0], flags=re.S))


def test_doc_has_the_agc_section_and_examples():
  assert "## Using AGC in your own project" in DOC.read_text()
  assert len(BLOCKS) == 2  # the README's AGC example, the recipe in docs/models.md


@pytest.mark.parametrize("index,expected", [(0, r"fraction of units clipped: (0|1)\.\d+"),
                                            (1, r"loss: \d+\.\d+ ema steps: 3")])
def test_example_runs(index, expected):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(BLOCKS[index], f"{DOC}:block{index}", "exec"), {"__name__": "__docs__"})
  assert re.fullmatch(expected, out.getvalue().strip()), out.getvalue()
