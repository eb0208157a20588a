"""End-to-end causal value study on a tiny random model: outputs, resumption, bad input."""
import json

import numpy as np
import pytest

from configs import causal as causal_config
from valuedist.studies import causal as causal_study, engine as runs
from valuedist.studies.causal import sae as causal_sae
from valuedist import data
from valuedist.eval import likelihood
from valuedist.values import sae as sae_lib
from tests import hf_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  return str(hf_tiny.save_model_dir(root / "m", "llama", seed=3, chat_template=hf_tiny.CHAT_TEMPLATE,
                                    max_positions=1024))


def config(model_dir, out, **kw):
  c = causal_config.get_config()
  c.models = model_dir
  c.out_dir = str(out)
  c.cache_dir = str(out) + "_cache"
  c.max_roles, c.bootstrap, c.batch_size, c.bucket, c.mesh.data = 14, 5, 16, 128, 1
  c.sae.width, c.sae.k, c.sae.steps, c.sae.batch, c.sae.ckpt_every = 64, 4, 20, 64, 10
  c.sae.corpus_new_tokens, c.sae.max_tokens = 3, 32
  c.sae.coefs = (0.0, 1.0)
  for k, v in kw.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope="module")
def full_run(model_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("full") / "run"
  return out, causal_study.run(config(model_dir, out))[model_dir]


def test_outputs_written(full_run):
  out, s = full_run
  d = out / "m"
  for name in ("records.jsonl", "scores.csv", "summary.json", "report.md", "graph.png", "correlation.png", "sae.npz"):
    assert (d / name).stat().st_size > 0, name
  rows = (d / "scores.csv").read_text().splitlines()
  assert len(rows) == 1 + 15 and rows[0].startswith("role,self_direction")
  assert set(s["role_steering"]) == set(causal_study.VALUES)
  a = s["agreement"]
  assert 0 <= a["sign_agreement"] <= 1 and a["reference_edges"] == 12      # circumplex neighbours, one shared wedge
  chance = {e["metric"]: e for e in s["comparisons"] if "observed" in e}  # every agreement figure against chance
  assert {"sign_agreement", "precision", "recall", "shd"} <= set(chance)
  paired = [e for e in s["comparisons"] if "paired" in e]                 # SAE feature vs random direction, ...
  assert paired and all(e["p_holm"] >= e["p"] for e in paired)
  assert set(s["option_mass"]) == {"no role", "roles"} and 0 < s["option_mass"]["roles"]["min"] <= 1
  assert chance["sign_agreement"]["observed"] == pytest.approx(a["sign_agreement"])
  assert all(0 <= e["null_percentile"] <= 100 and e["chance"] is not None for e in chance.values())
  assert "Against chance" in (d / "report.md").read_text() and "Checkpoints:" in (d / "report.md").read_text()
  assert s["provenance"]["models"]["model"]["spec"] == s["model"] and s["provenance"]["commit"]
  q = s["sae"]["quality"]
  assert q["width"] == 64 and q["l0"] <= 4.5 and 0 <= q["dead_share"] <= 1
  # the model's own answers to the shipped prompts joined the SAE corpus: prompt + up to 3 new tokens
  own = [r for r in runs.ResultStore(d / "records.jsonl").records() if r["unit"].startswith("corpus#")]
  assert len(own) == len(data.load_prompts()) and all(len(r["tokens"]) >= 2 for r in own)
  c = causal_config.get_config()
  c.max_roles = 14
  assert q["sequences"] == len(causal_sae.corpus(causal_study.resolve_inputs(c))) + len(own)
  assert len(s["sae"]["steering"]) == 2 * len(causal_study.VALUES)


def test_zero_coefficient_sae_steering_changes_nothing(full_run):
  _, s = full_run
  zero = [e for e in s["sae"]["steering"] if e["coef"] == 0.0]
  assert zero and all(np.abs(e["delta"]).max() == 0 for e in zero)
  moved = [e for e in s["sae"]["steering"] if e["coef"] == 1.0]
  assert any(np.abs(e["delta"]).max() > 0 for e in moved)


def test_resume_after_interruption(full_run, model_dir, tmp_path, monkeypatch):
  out_full, s_full = full_run
  out = tmp_path / "run"
  calls = {"n": 0}
  real = likelihood.option_logits

  def flaky(*a, **kw):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("simulated interruption")
    return real(*a, **kw)
  monkeypatch.setattr(likelihood, "option_logits", flaky)
  with pytest.raises(KeyboardInterrupt):
    causal_study.run(config(model_dir, out))
  with open(out / "m" / "records.jsonl", "a") as f:
    f.write('{"unit": "roles/9", "trunc')
  monkeypatch.setattr(likelihood, "option_logits", real)
  s = causal_study.run(config(model_dir, out))[model_dir]
  assert s["correlation"] == s_full["correlation"] and s["graph"] == s_full["graph"]


@pytest.mark.parametrize("kind,match", [
    ("unknown_value", "unknown value 'kindness'"),
    ("few_roles", "more roles than values"),
    ("sae_width", "use an SAE trained on this model"),
    ("sae_positions", "sae.positions 'tokens' is unknown"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(model_dir, tmp_path, kind, match):
  out = tmp_path / "out"
  c = config(model_dir, out)
  if kind == "unknown_value":
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"id": "x", "value": "kindness", "text": "This person is kind."}) + "\n")
    c.questionnaire = str(p)
  elif kind == "few_roles":
    c.max_roles = 5
  elif kind == "sae_positions":
    c.sae.positions = "tokens"
  else:
    p = tmp_path / "sae.npz"
    sae_lib.save_sae(p, sae_lib.init_topk(__import__("jax").random.PRNGKey(0), 32, 16, 2))
    c.sae.path = str(p)
  with pytest.raises(ValueError, match=match) as err:
    causal_study.run(c)
  assert "\n" not in str(err.value)
  assert not out.exists()


def test_sae_corpus_drops_each_rows_first_token_and_bos():
  tokens = np.array([[0, 0, 7, 8, 9], [5, 1, 6, 1, 4], [0, 0, 0, 0, 0]])
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  m = causal_sae.not_sink_mask(tokens, mask, bos_id=1)
  np.testing.assert_array_equal(m, [[0, 0, 0, 1, 1], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
  m = causal_sae.not_sink_mask(tokens, mask, bos_id=None)
  np.testing.assert_array_equal(m, [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
