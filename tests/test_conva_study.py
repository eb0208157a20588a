"""End-to-end ConVA study on tiny random models: outputs, resumption, devices, bad input."""
import json

import numpy as np
import pytest

from configs import conva as conva_config
from valuedist import conva, conva_study, runs
from tests import hf_tiny


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  steered = hf_tiny.save_model_dir(root / "steered", "llama", seed=1, chat_template=hf_tiny.CHAT_TEMPLATE,
                                   max_positions=1024)
  judge = hf_tiny.save_model_dir(root / "judge", "gemma3", seed=2, max_positions=1024)
  return str(steered), str(judge)


def config(model_dirs, out, **kw):
  c = conva_config.get_config()
  c.model, c.judge = model_dirs
  c.out_dir = str(out)
  c.cache_dir = str(out) + "_cache"
  c.target_values = "power,security"
  c.max_dilemmas, c.max_mc, c.max_new_tokens, c.batch_size, c.bootstrap = 4, 8, 4, 4, 200
  c.layers = "auto,0-1"
  c.auto_width = 1
  c.p0s = "0.9"
  c.probe.max_iter = 100
  c.mesh_data = 1
  c.anchor.margin = 0.5
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _records(out):
  recs = runs.ResultStore(out / "records.jsonl").records()
  return sorted(recs, key=lambda r: (r["unit"], r["id"]))


@pytest.fixture(scope="module")
def full_run(model_dirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("full") / "run"
  return out, conva_study.run(config(model_dirs, out))


def test_outputs_written(full_run):
  out, s = full_run
  for name in ("records.jsonl", "summary.json", "results.csv", "report.md", "probe_accuracy.csv",
               "probe_accuracy.json", "probe_accuracy.png", "control_vs_fluency.png", "control_by_value.png"):
    assert (out / name).stat().st_size > 0, name
  methods = {r["method"] for r in s["results"]}
  assert methods == set(conva_study.METHODS)
  assert {r["prefix"] for r in s["results"]} == {"none", "opposite"}
  for r in s["results"]:
    assert r["n"] == 8 and 0 <= r["control_success"] <= 1 and r["mc_accuracy"] is not None
  names = {r["condition"] for r in s["results"]}
  assert "conva@L0-1,p0=0.9" in names and "caa@L0-1,coef=4" in names
  acc = s["probe_accuracy"]["power"]
  assert len(acc["controlled_test"]) == 3                   # the tiny model has 3 layers
  vp = conva.load_value_probes(out / "probes" / "controlled")
  assert vp.values == ("power", "security") and vp.w.shape[:2] == (2, 3)


def test_conva_steering_moves_the_steered_probe(full_run, model_dirs):
  """Where the gate opened, ConVA added an edit; where it did not, nothing was added."""
  out, _ = full_run
  recs = [r for r in _records(out) if r["kind"] == "dilemma" and r["method"] == "conva"]
  assert recs
  assert all(r["edit_norm"] == 0 for r in recs if not r["gated"])
  none = [r for r in _records(out) if r["kind"] == "dilemma" and r["method"] == "none"]
  assert all(r["edit_norm"] == 0 for r in none)


def test_gate_off_and_zero_eps_change_nothing(model_dirs, tmp_path):
  """p0 so small that every probe already reads above it (eps = 0): the answers equal no steering."""
  s_out = tmp_path / "run"
  conva_study.run(config(model_dirs, s_out, methods="none,conva", p0s="1e-12", robustness=False, max_mc=4,
                         layers="0-1"))
  recs = [r for r in _records(s_out) if r["kind"] == "dilemma"]
  by = {}
  for r in recs:
    by.setdefault(r["method"], {})[(r["value"], r["id"])] = r["response_tokens"]
  assert by["conva"] == by["none"]


def test_resume_after_interruption_reproduces_the_result(full_run, model_dirs, tmp_path, monkeypatch):
  out_full, s_full = full_run
  out = tmp_path / "run"
  calls = {"n": 0}
  real = runs.generate_batch

  def flaky(*a, **kw):
    calls["n"] += 1
    if calls["n"] == 4:
      raise KeyboardInterrupt("simulated interruption")
    return real(*a, **kw)
  monkeypatch.setattr(runs, "generate_batch", flaky)
  with pytest.raises(KeyboardInterrupt):
    conva_study.run(config(model_dirs, out))
  assert 0 < len(_records(out)) < len(_records(out_full))
  with open(out / "records.jsonl", "a") as f:
    f.write('{"unit": "dilemma/power/none/none/0", "trunc')
  monkeypatch.setattr(runs, "generate_batch", real)
  s = conva_study.run(config(model_dirs, out))
  assert _records(out) == _records(out_full)
  assert s["results"] == s_full["results"]


def test_eight_devices_equal_one(model_dirs, tmp_path):
  kw = dict(batch_size=8, target_values="power", methods="none,conva", robustness=False, layers="0-1")
  conva_study.run(config(model_dirs, tmp_path / "run1", mesh_data=1, **kw))
  conva_study.run(config(model_dirs, tmp_path / "run8", mesh_data=8, **kw))
  a, b = _records(tmp_path / "run1"), _records(tmp_path / "run8")
  assert len(a) == len(b) > 0
  for ra, rb in zip(a, b):
    assert ra.get("response_tokens") == rb.get("response_tokens") and ra.get("correct") == rb.get("correct")
    assert ra.get("edit_norm", 0) == pytest.approx(rb.get("edit_norm", 0), rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("kind,match", [
    ("unknown_value", "unknown value 'kindness'"),
    ("empty_pairs", "holds no scenarios"),
    ("bad_p0", r"outside \(0, 1\)"),
    ("bad_layers", "outside the model's layers"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(model_dirs, tmp_path, kind, match):
  out = tmp_path / "out"
  c = config(model_dirs, out)
  if kind == "unknown_value":
    c.target_values = "power,kindness"
  elif kind == "empty_pairs":
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n")
    c.scenarios = str(p)
  elif kind == "bad_p0":
    c.p0s = "0.9,1.5"
  else:
    c.layers = "0-7"
  with pytest.raises(ValueError, match=match) as err:
    conva_study.run(c)
  assert "\n" not in str(err.value)
  assert not out.exists()
