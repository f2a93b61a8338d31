"""Executes every notebook in colab/ top to bottom, on small settings.

A notebook's cell tagged `parameters` holds its settings; a cell injected after
it shrinks them (the papermill convention), so the test is quick and the
notebook a user opens keeps its real settings. The kernels run with XLA's
optimisations off (`JAX_DISABLE_MOST_OPTIMIZATIONS`): at these sizes compiling
is most of a notebook's time, and the test checks that it runs through and
what it prints, not its speed.
"""

import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL_SETTINGS = {
    "quickstart.ipynb": "FEATURES = (32,)\nNUM_STEPS = 60\n",
    "rebasin.ipynb": "DATASET = 'digits'\nWIDTH = 32\nNUM_STEPS = 100\nNUM_POINTS = 3\n",
    "pleas.ipynb": "WIDTH = 32\nNUM_STEPS = 150\nBUDGETS = (1.0, 1.5)\n",
    "lm_merge.ipynb": "EMBED_DIM = 16\nDEPTH = 1\nCONTEXT = 16\nNUM_STEPS = 60\nMAX_BYTES = 20000\n"
                      "WINDOWS = 32\nBUDGETS = (1.0,)\n",
}
# What each notebook prints when it runs through.
PRINTS = {
    "quickstart.ipynb": ("ensemble", "restored from"),
    "rebasin.ipynb": ("naive", "weight matching", "train loss barrier"),
    "pleas.ipynb": ("model A", "permute and average", "PLeaS", "condition"),
    "lm_merge.ipynb": ("model A (code)", "ensemble", "permute and average 1.0", "PLeaS 1.0", "widened groups"),
}


def test_every_notebook_has_small_settings():
  assert sorted(p.name for p in (ROOT / "colab").glob("*.ipynb")) == sorted(SMALL_SETTINGS)


def _with_small_settings(nb, settings: str):
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(settings))
  return nb


@pytest.mark.parametrize("name", sorted(SMALL_SETTINGS))
def test_notebook_executes(name, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # the kernel inherits it
  nb = nbformat.read(ROOT / "colab" / name, as_version=4)
  nb = _with_small_settings(nb, SMALL_SETTINGS[name])
  nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  errors = [
      out for cell in nb.cells if cell.cell_type == "code"
      for out in cell.get("outputs", []) if out.output_type == "error"
  ]
  assert not errors
  printed = "".join(
      out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
      for out in cell.get("outputs", []) if out.output_type == "stream"
  )
  for text in PRINTS[name]:
    assert text in printed
