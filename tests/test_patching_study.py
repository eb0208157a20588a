"""The worked patching example (launch.patching) end to end on a tiny random model: outputs,
agreement with direct patching, resume, and bad input."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import patching as patching_config
from valuedist import checkpoints
from valuedist.interp import patching
from valuedist.model import transformer
from valuedist.model.edits import Patch, Where
from valuedist.studies import patching as study
from tests import hf_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return str(hf_tiny.save_model_dir(tmp_path_factory.mktemp("patch") / "m", "llama", seed=4))


def _config(model_dir, out):
  c = patching_config.get_config()
  c.model = model_dir
  c.template = "Capital of {}:"
  c.answer_prefix = ""
  c.pairs = "Aa:P,Bb:Q,Cc:R,Dd:S"
  c.grids = "resid_pre:layer,position;attn.z:layer,head"
  c.bootstrap, c.permutations = 20, 20
  c.out_dir = str(out)
  return c


def test_patching_example_writes_grids_that_match_a_direct_patch(tiny_dir, tmp_path):
  c = _config(tiny_dir, tmp_path / "run")
  summary = study.run(c)
  out = tmp_path / "run"
  for name in ("summary.json", "cells.csv", "report.md", "patching_resid_pre.png", "patching_attn.z.png",
               "grids/resid_pre.npz", "attribution_grids.npz"):
    assert (out / name).exists(), name
  assert [x["metric"].split(", ")[2] for x in summary["comparisons"]] == ["resid_pre by layer x position",
                                                                           "attn.z by layer x head"]
  for x in summary["comparisons"]:
    assert -1 <= x["observed"] <= 1 and x["ci"][0] <= x["ci"][1] and 0 <= x["null_percentile"] <= 100
  # one grid cell recomputed by hand: the subject token's resid_pre at layer 1 patched clean -> corrupted
  m = checkpoints.load(tiny_dir)
  clean, good, labels = study.prompts(m, c.template, study.parse_pairs(c.pairs), "")
  assert labels.count("{subject}") == 2               # two bytes vary
  corrupt, bad = np.roll(clean, -1, 0), np.roll(good, -1)
  metric = patching.logit_difference(jnp.asarray(good), jnp.asarray(bad))
  _, _, cache = transformer.forward(m.params, jnp.asarray(clean), m.cfg, taps=("resid_pre",))
  pos = labels.index("{subject}")
  iv = Patch(site="resid_pre", source=cache["resid_pre"],
             where=Where(layers=jnp.eye(m.cfg.n_layers)[1], positions=jnp.asarray([pos - clean.shape[1]]), relative=True))
  want = metric(transformer.forward(m.params, jnp.asarray(corrupt), m.cfg, intervene=iv)[0])
  with np.load(out / "grids/resid_pre.npz") as f:
    np.testing.assert_allclose(f["metric"][1, pos], np.asarray(want), atol=1e-5)
  # a rerun resumes from the files (they are not rewritten); another config in the folder is refused
  stamp = (out / "grids/resid_pre.npz").stat().st_mtime_ns
  assert study.run(c)["comparisons"] == summary["comparisons"]
  assert (out / "grids/resid_pre.npz").stat().st_mtime_ns == stamp
  c.pairs = "Aa:P,Bb:Q,Cc:R"
  with pytest.raises(ValueError, match="another config"):
    study.run(c)


def test_patching_example_bad_input(tiny_dir, tmp_path):
  c = _config(tiny_dir, tmp_path / "bad")
  c.pairs = "Aa:P,Bbb:Q"
  with pytest.raises(ValueError, match="differ in token count"):
    study.run(c)
  c.pairs = "Aa:P,Bb:P"
  with pytest.raises(ValueError, match="share their first token"):
    study.run(c)
  c = _config(tiny_dir, tmp_path / "bad2")
  c.grids = "final:layer,position"
  with pytest.raises(ValueError, match="block sites"):
    study.run(c)
