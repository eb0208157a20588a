"""End-to-end ConVA study on tiny random models: outputs, resumption, devices, bad input."""
import json

import numpy as np
import pytest

from configs import conva as conva_config
import jax.numpy as jnp

from valuedist.model import transformer as model
from valuedist.parallel import sharding
from valuedist.studies import conva as conva_study, engine as runs, runner
from valuedist.studies.conva import detect as conva_detect, inputs as conva_inputs, judge as conva_judge, \
    sweep as conva_sweep
from valuedist.values import conva
from tests import hf_tiny, study_checks


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
  c.layer_exclude_last = 1            # the tiny models have 2 layers
  c.p0s = "0.9"
  c.probe.max_iter = 100
  c.mesh.data = kw.pop("mesh_data", 1)
  c.anchor.margin = 0.5
  c.anchor_first_pieces = True       # the tiny test tokenizer has few whole-word tokens
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _records(out):
  recs = runs.ResultStore(out / "records.jsonl").records()
  return sorted(recs, key=lambda r: (r["unit"], r["value"], r["condition"], r.get("prefix", ""), r["id"]))


@pytest.fixture(scope="module")
def full_run(model_dirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("full") / "run"
  return out, conva_study.run(config(model_dirs, out))


def test_outputs_written(full_run):
  out, s = full_run
  for name in ("records.jsonl", "summary.json", "results.csv", "report.md", "probe_accuracy.csv",
               "probe_accuracy.json", "probe_accuracy.png", "control_vs_fluency.png", "control_by_value.png",
               "control_effects.png"):
    assert (out / name).stat().st_size > 0, name
  methods = {r["method"] for r in s["results"]}
  assert methods == set(conva_inputs.METHODS)
  assert {r["prefix"] for r in s["results"]} == {"none", "opposite"}
  for r in s["results"]:
    assert r["n"] == 8 and 0 <= r["control_success"] <= 1 and r["mc_accuracy"] is not None
  names = {r["condition"] for r in s["results"]}
  assert {"conva@0-1,p0=0.9", "caa@0-1,coef=4", "conva@auto,p0=0.9", "caa@auto,coef=4"} <= names
  assert {"conva@0-1,p0=0.9,ungated", "caa@auto,coef=4,ungated", "prompt,ungated", "anchor,ungated", "prompt",
          "anchor"} <= names
  # every activation edit has its matched random-direction control, gated and ungated alike
  controlled = {n for n in names if n.split("@")[0].split(",")[0] in conva_inputs.CONTROLLED}
  controls = {n for n in controlled if ",random" in n}
  assert controls and {n.replace(",random", "") for n in controls} == controlled - controls
  assert {"conva@auto,p0=0.9,random", "caa@0-1,coef=4,random,ungated", "anchor,random", "anchor,random,ungated"} <= controls
  assert not any(",random" in n for n in names - controlled)
  for r in s["results"]:          # every method under the same gate; gate-open shares only where a gate acted
    assert r["gated"] == (r["method"] != "none" and not r["condition"].endswith(",ungated"))
    assert (r["gate_open_share"] is None) == (not r["gated"])
    assert r["steered_share"] == (0.0 if r["method"] == "none" else 1.0 if not r["gated"] else r["gate_open_share"])
    assert r["mc_n"] == 8 and r["mc_n_steered"] == (0 if r["method"] == "none" else 8 if not r["gated"] else r["mc_n_steered"])
  comps = s["comparisons"]
  assert {e["treatment"] for e in comps if e["control"] == "none"} == names - {"none"}
  vs_control = [e for e in comps if e["control"] != "none"]     # each method against its own control, per prefix
  assert sorted((e["treatment"], e["control"]) for e in vs_control) == \
      sorted((n.replace(",random", ""), n) for n in controls for _ in ("none", "opposite"))
  assert all(e["metric"].startswith("control_success") for e in vs_control)
  for e in comps:
    assert set(e) == {"metric", "treatment", "control", "estimate", "ci", "p", "p_holm", "n", "paired"}
    assert e["paired"] and e["ci"][0] <= e["estimate"] <= e["ci"][1] and e["p_holm"] >= e["p"]
  assert all(f["flag"] in ("floor", "ceiling") for f in s["floors_and_ceilings"])
  # one row per condition, every value pooled in it (auto layers differ per value, the name does not)
  assert len(names) == len(s["results"]) // 2
  acc = s["probe_accuracy"]["power"]
  assert len(acc["val_acc"]) == 3                           # the tiny model has 3 layers
  assert acc["chosen_layers"] and all(0 <= l < 3 - 1 for l in acc["chosen_layers"])     # last layer excluded
  for key in ("test_acc_at_chosen", "val_acc_at_chosen", "uncontrolled_test_at_chosen", "transfer_at_chosen",
              "pairwise_uncontrolled_at_chosen", "pairwise_controlled_at_chosen"):
    assert 0 <= acc[key] <= 1
  assert not any("test" in k for k in acc if k not in {"test_acc_at_chosen", "uncontrolled_test_at_chosen"})
  lines = (out / "probe_accuracy.csv").read_text().splitlines()
  header = lines[0].split(",")
  assert header[:2] == ["value", "layer"] and "cosine_controlled_uncontrolled" in header
  assert not any("test" in h for h in header)               # per-layer test accuracy is never reported
  col = header.index("cosine_controlled_uncontrolled")
  assert all(-1 - 1e-6 <= float(line.split(",")[col]) <= 1 + 1e-6 for line in lines[1:])
  splits = s["splits"]["roles"]["power"]
  assert all(splits[k] for k in ("train", "val", "test", "detector"))
  assert not set(splits["detector"]) & set(splits["train"] + splits["val"] + splits["test"])
  rates = s["gate_open_rates"]
  assert set(rates["dilemmas"]) == {"power", "security"} and set(rates["dilemmas"]["power"]) == {"power", "security"}
  assert all(0 <= x <= 1 for x in rates["mc"].values())
  assert 0 <= s["judge_layer"] < 3 and 0 <= s["gate_layer"] < 3
  assert len(s["detector_layer_choice"]["judge"]) == 3               # 'auto': a validation accuracy per layer
  ja = s["judge_on_labelled_answers"]
  assert ja["n"] == 24 and set(ja["per_value"]) == {"power", "security"} and 0 <= ja["overall"] <= 1
  # capability: every condition answers every MC question exactly once (dealt round-robin to the values)
  mc = [r for r in _records(out) if r["kind"] == "mc"]
  for cond in {r["condition"] for r in mc}:
    ids = [r["id"] for r in mc if r["condition"] == cond]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8
  assert all(r["mc_cloze_accuracy"] is not None for r in s["results"])
  report = (out / "report.md").read_text()
  assert "## Control success per value" in report and "| power |" in report
  vp = conva.load_value_probes(out / "probes" / "controlled")
  assert vp.values == ("power", "security") and vp.w.shape[:2] == (2, 3)


def test_conva_steering_moves_the_steered_probe(full_run, model_dirs):
  """Where the gate opened, ConVA added an edit; where it did not, nothing was added."""
  out, _ = full_run
  recs = [r for r in _records(out) if r["kind"] == "dilemma" and r["method"] == "conva"]
  assert recs
  assert all(r["edit_norm"] == 0 for r in recs if not r["steered"])
  assert all(r["steered"] == (r["gate_open"] or not r["gated"]) for r in recs)
  none = [r for r in _records(out) if r["kind"] == "dilemma" and r["method"] == "none"]
  assert all(r["edit_norm"] == 0 for r in none)


def test_controls_edit_with_the_methods_norms(full_run):
  """CAA's and ConVA's random-direction controls apply, per dilemma, the method's edit norm
  (ConVA's decided by the method on that very prompt) on the same gated rows."""
  out, _ = full_run
  recs = [r for r in _records(out) if r["kind"] == "dilemma" and r["method"] in ("caa", "conva")]
  by = {(r["condition"], r["prefix"], r["value"], r["id"]): r for r in recs}
  pairs = [(by[(cond.replace(",random", ""),) + k[1:]], r) for k, r in by.items() for cond in [k[0]] if ",random" in cond]
  assert len(pairs) == len(recs) // 2 and any(m["edit_norm"] > 0 for m, _ in pairs)
  for m, ctrl in pairs:
    assert ctrl["random_control"] and not m["random_control"]
    assert (ctrl["steered"], ctrl["gate_open"], ctrl["layers"]) == (m["steered"], m["gate_open"], m["layers"])
    assert ctrl["edit_norm"] == pytest.approx(m["edit_norm"], rel=1e-3, abs=2e-4)
  # the direction differs: the controls' answers are not the method's
  assert any(m["response_tokens"] != ctrl["response_tokens"] for m, ctrl in pairs if m["edit_norm"] > 0)


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


def test_llm_judge_option(full_run, model_dirs, tmp_path):
  """judge_kind='llm' rescores the same answers with a language model asked Yes/No; the
  answers themselves are reused (nothing is generated again)."""
  import shutil
  out_full, s_full = full_run
  out = tmp_path / "run"
  shutil.copytree(out_full, out)
  before = (out / "records.jsonl").read_text()
  s = conva_study.run(config(model_dirs, out, judge_kind="llm", llm_judge_options="Y,N"))
  assert (out / "records.jsonl").read_text() == before
  [path] = out.glob("judge_llm_*.jsonl")
  scores = runs.ResultStore(path).records()
  n_dilemmas = sum(r["n"] for r in s_full["results"])
  assert len(scores) == n_dilemmas and all(0 < x["toward"] < 1 for x in scores)
  assert s["judge_kind"] == "llm" and "asked yes or no" in (out / "report.md").read_text()
  # one score by hand: the judge model's 'Y' vs 'N' logits after the chat-formatted question
  rec = next(r for r in _records(out) if r["kind"] == "dilemma")
  inputs = conva_study.resolve_inputs(config(model_dirs, out))
  judge = runner.load_runner("judge", model_dirs[1], config(model_dirs, out), [], sharding.make_mesh(1))
  question = next(d["question"] for d in inputs.dilemmas[rec["value"]] if d["id"] == rec["id"])
  text = conva_judge.LLM_JUDGE_QUESTION.format(question=question, answer=rec["response"].strip() or "(empty)",
                                               description=inputs.prefixes[rec["value"]]["description"], yes="Y", no="N")
  ids = judge.encode([{"prompt": text}])[0]
  logits, _, _ = model.forward(judge.model.params, jnp.asarray([ids], jnp.int32), judge.cfg)
  z = np.asarray(logits[0, -1], np.float64)
  tok = judge.model.tokenizer
  single = lambda forms: [t[0] for t in (tok.encode(f, add_special_tokens=False) for f in forms) if len(t) == 1]
  lse = lambda forms: np.logaddexp.reduce([z[i] for i in single(forms)])
  want = 1 / (1 + np.exp(lse(["N", " N"]) - lse(["Y", " Y"])))
  got = next(x["toward"] for x in scores if all(x[k] == rec[k] for k in conva_judge.ANSWER_KEY))
  assert got == pytest.approx(float(want), abs=1e-5)
  with pytest.raises(ValueError, match="judge_kind 'gpt' is unknown"):
    conva_study.run(config(model_dirs, tmp_path / "bad", judge_kind="gpt"))


def test_resume_after_interruption_reproduces_the_result(full_run, model_dirs, tmp_path, monkeypatch):
  out_full, s_full = full_run
  out = tmp_path / "run"
  calls = {"n": 0}
  real = conva_sweep.ANSWERS

  def flaky(*a, **kw):
    calls["n"] += 1
    if calls["n"] == 4:
      raise KeyboardInterrupt("simulated interruption")
    return real(*a, **kw)
  monkeypatch.setattr(conva_sweep, "ANSWERS", flaky)
  with pytest.raises(KeyboardInterrupt):
    conva_study.run(config(model_dirs, out))
  assert 0 < len(_records(out)) < len(_records(out_full))
  with open(out / "records.jsonl", "a") as f:
    f.write('{"unit": "dilemma/power/none/none/0", "trunc')
  monkeypatch.setattr(conva_sweep, "ANSWERS", real)
  s = conva_study.run(config(model_dirs, out))
  assert _records(out) == _records(out_full)
  assert s["results"] == s_full["results"]


def test_eight_devices_equal_one(model_dirs, tmp_path):
  kw = dict(batch_size=8, target_values="power", methods="none,conva", robustness=False, layers="0-1",
            bucket=64)     # coarser prompt-length buckets: fewer shapes to compile
  conva_study.run(config(model_dirs, tmp_path / "run1", mesh_data=1, **kw))
  conva_study.run(config(model_dirs, tmp_path / "run8", mesh_data=8, **kw))
  a, b = _records(tmp_path / "run1"), _records(tmp_path / "run8")
  assert len(a) == len(b) > 0
  for ra, rb in zip(a, b):
    assert ra.get("response_tokens") == rb.get("response_tokens") and ra.get("correct") == rb.get("correct")
    assert ra.get("edit_norm", 0) == pytest.approx(rb.get("edit_norm", 0), rel=1e-3, abs=1e-3)


def test_shared_batches_give_the_records_of_one_condition_per_batch(model_dirs, tmp_path):
  """Every method and control, gated and ungated, in batches shared across values and
  conditions (one program per intervention kind and shape) gives exactly the records of one
  value x condition per batch, unit names aside; and fewer batches."""
  kw = dict(robustness=False, max_mc=4, max_dilemmas=3)
  conva_study.run(config(model_dirs, tmp_path / "shared", share_batches=True, **kw))
  conva_study.run(config(model_dirs, tmp_path / "apart", share_batches=False, **kw))
  key = lambda r: (r["kind"], r["value"], r["condition"], r.get("prefix", ""), r["id"])
  shared, apart = (sorted(_records(tmp_path / d), key=key) for d in ("shared", "apart"))
  assert {r["method"] for r in shared} == set(conva_inputs.METHODS) and any(r["random_control"] for r in shared)
  assert [dict(r, unit=None) for r in shared] == [dict(r, unit=None) for r in apart]      # floats bitwise
  assert len({r["unit"] for r in shared}) < len({r["unit"] for r in apart}) / 2
  store = runs.ResultStore(tmp_path / "shared" / "records.jsonl")             # rows, not batches, are reused:
  n = len(store.records())                                                    # rebatched, nothing is redone
  conva_study.run(config(model_dirs, tmp_path / "shared", share_batches=False, **kw))
  assert len(store.records()) == n


def test_sweep_units_pack_rows_by_kind_and_own_length():
  import ml_collections
  from valuedist.studies.conva import sweep
  conds = [conva_inputs.Condition("none"), conva_inputs.Condition("caa", "0-1", (0, 1), coef=1.0, gated=True),
           conva_inputs.Condition("conva", "0-1", (0, 1), p0=0.9), conva_inputs.Condition("anchor", control=True)]
  rng = np.random.RandomState(0)
  rows = [sweep.Row(v, cond, "none", i, [1] * int(rng.randint(3, 40)), bool(i % 2), id=f"q{i}")
          for v in ("power", "security") for cond in conds for i in range(7)]
  for share in (True, False):
    c = ml_collections.ConfigDict(dict(share_batches=share, bucket=16))
    units = sweep.sweep_units("dilemma", rows, 4, c)
    assert sorted(id(r) for u in units for r in u.rows) == sorted(id(r) for r in rows)    # every row once
    assert len({u.key for u in units}) == len(units)
    for u in units:
      assert 0 < len(u.rows) <= 4
      assert {sweep.program_kind(r.cond, r.value) for r in u.rows} == {u.kind}
      assert {-(-len(r.tokens) // 16) * 16 for r in u.rows} == {u.length}     # each row's own padded length
      if not share:
        assert len({(r.value, r.cond, r.prefix) for r in u.rows}) == 1
    kinds = {u.kind for u in units}
    assert kinds == {"add", "conva", "anchor-power-control", "anchor-security-control"}
  mixed = sweep.sweep_units("d", rows, 4, ml_collections.ConfigDict(dict(share_batches=True, bucket=16)))
  assert any(len({(r.value, r.cond) for r in u.rows}) > 1 for u in mixed)        # rows of several conditions share


@pytest.mark.parametrize("kind,match", [
    ("unknown_value", "unknown value 'kindness'"),
    ("empty_pairs", "holds no scenarios"),
    ("bad_p0", r"outside \(0, 1\)"),
    ("bad_layers", "outside the model's layers"),
    ("bad_judge_layer", "judge_layer 7 is outside the judge model's layers"),
    ("judge_trains_on_validation", "both in the judge's training answers and its validation answers"),
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
  elif kind == "bad_judge_layer":
    c.judge_layer = "7"
  elif kind == "judge_trains_on_validation":      # a validation answer in the judge's training file
    p = tmp_path / "judge_answers.jsonl"
    p.write_text((conva_inputs.schwartz.ANSWERS_FILE).read_text().splitlines()[0] + "\n")
    c.judge_answers = str(p)
  else:
    c.layers = "0-7"
  with pytest.raises(ValueError, match=match) as err:
    conva_study.run(c)
  assert "\n" not in str(err.value)
  assert not out.exists()


def test_judge_trains_on_its_own_answers_and_detector_scenarios_only(model_dirs, tmp_path):
  """The judge's rows: both sides of the detector scenarios' statement/vignette pairs plus the
  judge-only labelled answers of the value, grouped by question; never a probe scenario or a
  validation answer. judge_answers='none' leaves the scenarios only."""
  c = config(model_dirs, tmp_path / "x")
  inputs = conva_inputs.resolve_inputs(c)
  texts, y, groups = conva_detect.judge_rows(inputs, "power")
  own = [a for a in inputs.judge_answers if a["value"] == "power"]
  assert len(own) >= 20 and texts[-len(own):] == [a["answer"] for a in own]
  assert list(y[-len(own):]) == [int(a["label"] == "toward") for a in own] and 0 < y.mean() < 1
  scen = {g for g in groups if not g.startswith("answers/")}
  assert scen and all(inputs.roles[g] == "detector" for g in scen)
  validation = {a["answer"] for a in inputs.answers} | {a["question"] for a in inputs.answers}
  assert not validation & set(texts)
  assert len({g for g in groups if g.startswith("answers/")}) == len(own) // 2      # one group per question
  c.judge_answers = "none"
  only, _, _ = conva_detect.judge_rows(conva_inputs.resolve_inputs(c), "power")
  assert only == texts[:-len(own)]


def test_probes_are_reused_only_for_the_same_model_and_data(model_dirs, tmp_path, monkeypatch):
  """The probe cache is keyed by the model's weights (not its path) and every probe input: a copy
  of the model elsewhere reuses the probes, other weights or another probe setting refit them."""
  import importlib
  import shutil
  conva_identify = importlib.import_module("valuedist.studies.conva.identify")   # the package re-exports identify()
  fits = []
  real = conva_identify._fit_value
  monkeypatch.setattr(conva_identify, "_fit_value", lambda *a, **kw: fits.append(1) or real(*a, **kw))
  c = config(model_dirs, tmp_path / "run", target_values="power")
  inputs = conva_inputs.resolve_inputs(c)
  load = lambda spec: runner.load_runner("steered", spec, c, [], sharding.make_mesh(1))
  conva_identify.identify(load(model_dirs[0]), inputs, c, tmp_path / "run")
  assert len(fits) == 1
  moved = tmp_path / "moved"
  shutil.copytree(model_dirs[0], moved)
  conva_identify.identify(load(str(moved)), inputs, c, tmp_path / "run")
  assert len(fits) == 1                                  # same weights elsewhere: reused
  other = hf_tiny.save_model_dir(tmp_path / "other", "llama", seed=7, chat_template=hf_tiny.CHAT_TEMPLATE,
                                 max_positions=1024)
  conva_identify.identify(load(str(other)), inputs, c, tmp_path / "run")
  assert len(fits) == 2                                  # other weights: refitted
  c.probe.l2 = 1e-2
  conva_identify.identify(load(str(other)), inputs, c, tmp_path / "run")
  assert len(fits) == 3                                  # another probe setting: refitted


def test_probes_are_calibrated_where_the_edit_reads(full_run, model_dirs):
  """Probes are fitted at the answer position of chat-formatted pair texts, the position where
  ConVA reads and edits a chat-formatted dilemma; there the edited probe reads p0."""
  out, s = full_run
  c = config(model_dirs, out)
  r = runner.load_runner("steered", c.model, c, [], sharding.make_mesh(1))
  texts = ["I take charge of the meeting.", "Should I lead the team?"]
  lists = r.encode([{"prompt": t} for t in texts])
  tokens, mask = r.batch(lists, max(map(len, lists)), 2)
  _, _, taps = model.forward(r.model.params, tokens, r.cfg, attention_mask=mask, taps=("resid_post",), logits=False)
  np.testing.assert_allclose(r.generation_activations(texts, 2), np.asarray(taps["resid_post"][:, :, -1]), atol=1e-5)
  vp = conva.load_value_probes(out / "probes" / "controlled")
  layers = s["probe_accuracy"]["power"]["chosen_layers"]
  vi = vp.index("power")
  edit = conva.GatedMinimalActivation(vp.w[vi], vp.b[vi], conva.layer_mask(layers, r.cfg.n_layers),
                                      jnp.log(0.99 / 0.01), jnp.ones((2,)))
  deltas = conva.minimal_deltas(r.model.params, tokens, mask, edit, r.cfg)
  _, _, taps = model.forward(r.model.params, tokens, r.cfg, attention_mask=mask, taps=("resid_post",), logits=False,
                             intervene=model.AddToResidual(deltas))
  h = np.asarray(taps["resid_post"][:, :, -1])                               # [L, B, D] at the answer position
  logit = np.einsum("lbd,ld->lb", h, np.asarray(vp.w[vi])) + np.asarray(vp.b[vi])[:, None]
  assert np.all(1 / (1 + np.exp(-logit[layers])) >= 0.99 - 1e-4)


def test_report_recomputes_every_table_from_the_folder(full_run, tmp_path):
  study_checks.assert_report_recomputes(full_run[0], conva_study.report_dir, tmp_path)
