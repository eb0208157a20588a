"""End-to-end gap study on two tiny random models: outputs, resumption, devices, bad input."""
import json
import shutil

import pytest

from configs import gap as gap_config
from valuedist import data
from valuedist.studies import engine as runs, gap as gap_study, runner
from valuedist.studies.gap import phases as gap_phases
from tests import hf_tiny, study_checks


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  aligned = hf_tiny.save_model_dir(root / "aligned", "llama", seed=1, chat_template=hf_tiny.CHAT_TEMPLATE)
  base = hf_tiny.save_model_dir(root / "base", "gemma3", seed=2)
  return str(aligned), str(base)


def config(model_dirs, out, **kw):
  c = gap_config.get_config()
  c.aligned, c.base = model_dirs
  c.out_dir = str(out)
  c.cache_dir = str(out) + "_cache"
  c.max_prompts, c.max_new_tokens, c.batch_size, c.bootstrap = 10, 4, 4, 200
  c.mesh.data = kw.pop("mesh_data", 1)
  c.edit.margin = 0.5
  c.anchor_first_pieces = True       # the tiny test tokenizer has few whole-word tokens
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _records(out):
  recs = runs.ResultStore(out / "records.jsonl").records()
  return sorted(recs, key=lambda r: (r["unit"], r["id"]))


@pytest.fixture(scope="module")
def full_run(model_dirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("full") / "run"
  summary = gap_study.run(config(model_dirs, out))
  return out, summary


def test_outputs_written(full_run):
  out, summary = full_run
  for name in ("records.jsonl", "steps.csv", "summary.json", "summary.txt", "gap_vs_step.png", "prompt_gaps.png"):
    assert (out / name).stat().st_size > 0, name
  groups = summary["groups"]
  for key in ("free/aligned/none", "free/base/none", "forced/aligned/on_base", "forced/base/on_aligned",
              "edit/base/system_prompt", "edit/base/logit_bias", "edit/base/anchor_edit", "edit/base/anchor_edit_random",
              "forced/base/on_base_anchor_edit_random"):
    assert groups[key]["n"] == 10, key
  rows = {r["metric"]: r for r in summary["comparisons"]}
  for name in ("aligned_vs_base/free", "edit_effect/anchor_edit", "edit_effect/system_prompt", "edit_logits/anchor_edit",
               "edit_effect/anchor_edit_random", "edit_effect/anchor_edit_vs_random"):
    r = rows[f"normalised_gap/harmless/{name}"]
    assert set(r) >= {"metric", "treatment", "control", "estimate", "ci", "p", "p_holm", "n", "paired"}
    assert r["paired"] and r["n"] == 10 and r["ci"][0] <= r["estimate"] <= r["ci"][1] and r["p_holm"] >= r["p"]
    assert r["by_construction"] == name.startswith("edit_logits")
  assert rows["normalised_gap/harmless/edit_effect/anchor_edit"]["treatment"] == "forced/base/on_base_anchor_edit"
  vs = rows["normalised_gap/harmless/edit_effect/anchor_edit_vs_random"]      # the edit against its matched control
  assert (vs["treatment"], vs["control"]) == ("forced/base/on_base_anchor_edit", "forced/base/on_base_anchor_edit_random")
  judge = summary["judge"]
  assert judge["classes"] == ["refusal", "compliance", "non_answer"]
  assert judge["trained_on"]["written_responses"] == 300 and judge["trained_on"]["labelled_generations"] > 100
  for part in ("held_out", "labelled_generations"):
    assert set(judge[part]["per_class"]) == set(judge["classes"]) and 0 < judge[part]["chance"] < 1
  harmful = [r for r in _records(out) if r["phase"] in ("free", "edit") and r["category"] == "harmful"]
  scores = [json.loads(l) for l in (out / "judge_scores.jsonl").read_text().splitlines()]
  assert len(scores) == len(harmful) > 0 and {x["judge_class"] for x in scores} <= set(judge["classes"])
  g = summary["groups"]["free/base/none"]
  assert g["n_harmful"] == sum(r["model"] == "base" and r["phase"] == "free" for r in harmful)
  assert g["n_answers"] == g["n_harmful"] - round(g["non_answer_share"] * g["n_harmful"])
  judged = {r["metric"] for r in summary["comparisons"] if r["metric"].endswith("/harmful")}
  assert judged == {"refusal_share/harmful", "non_answer_share/harmful"}
  cov = summary["coverage"]["base"]
  assert set(cov["top_anchor_tokens"]["harmless"]) == {"positive", "negative"} and "dropped_pieces" in cov["harmless"]["negative"]
  assert summary["tokenizers_match"] is True
  shift = summary["token_shift"]
  assert shift["positions"] > 0
  assert abs(shift["unshifted"] + shift["marginal"] + shift["shifted"] - 1) < 1e-9 and shift["kl_mean"] >= 0
  header = (out / "steps.csv").read_text().splitlines()[0]
  assert header.endswith("mean,max,lse,normalised")


def test_anchor_edit_raises_the_edited_gap(full_run):
  out, summary = full_run
  g = summary["groups"]
  assert g["edit/base/anchor_edit"]["harmless/mean"]["mean"] > g["free/base/none"]["harmless/mean"]["mean"]


def test_refusal_judge_trains_on_written_and_generated_answers_never_on_validation(tmp_path):
  """The answer judge's rows: the written responses, then the labelled generations on prompts
  outside the prompt set, minus any text that is also a validation generation."""
  c = gap_config.get_config()
  rows, n_written = gap_study.refusal_training_rows(c)
  written = data.load_refusal_labels()
  assert rows[:n_written] == written and len(rows) > n_written
  validation = data.load_refusal_labels(data.REFUSAL_VALIDATION_FILE)
  assert not {r["text"] for r in rows} & {r["text"] for r in validation}
  study_prompts = {p["prompt"] for p in data.load_prompts()}
  assert not study_prompts & {r["prompt"] for _, r in data.read_jsonl(data.REFUSAL_GENERATIONS_FILE)}
  p = tmp_path / "gen.jsonl"                      # a validation text in the training file is dropped
  p.write_text(json.dumps(dict(validation[0])) + "\n" + json.dumps({"text": "Fine, here it is.", "label": "compliance"}) + "\n")
  c.refusal_generations = str(p)
  assert gap_study.refusal_training_rows(c)[0][n_written:] == [{"text": "Fine, here it is.", "label": "compliance"}]
  c.refusal_generations = "none"
  assert gap_study.refusal_training_rows(c) == (written, n_written)


def test_random_control_edits_but_not_towards_the_anchors(full_run):
  """The anchor edit's random-direction control changes the answers (same norms, another
  direction) but does not reach the edit's margin on the generating logits."""
  out, summary = full_run
  recs = _records(out)
  answers = {c: {r["id"]: r["response_tokens"] for r in recs if r["phase"] == "edit" and r["condition"] == c}
             for c in ("anchor_edit", "anchor_edit_random")}
  assert answers["anchor_edit"].keys() == answers["anchor_edit_random"].keys()
  assert answers["anchor_edit"] != answers["anchor_edit_random"]
  g = summary["groups"]
  assert g["edit/base/anchor_edit"]["harmless/mean"]["mean"] > g["edit/base/anchor_edit_random"]["harmless/mean"]["mean"]


def test_edit_effect_is_read_by_the_unedited_model(full_run, model_dirs):
  """The re-scored gap of an edited answer is the unedited base model's teacher-forced gap on
  those tokens, not the gap of the logits the edit produced."""
  out, _ = full_run
  c = config(model_dirs, out)
  recs = runs.ResultStore(out / "records.jsonl").records()
  edited = next(r for r in recs if r["phase"] == "edit" and r["condition"] == "anchor_edit" and r["response"])
  reread = next(r for r in recs if r["condition"] == "on_base_anchor_edit" and r["id"] == edited["id"])
  from valuedist import data
  from valuedist.parallel import sharding
  from valuedist.values import gap
  base = runner.load_runner("base", c.base, c, [data.load_lexicon("harmless")], sharding.make_mesh(1))
  prompt = next(p for p in data.load_prompts() if p["id"] == edited["id"])
  resp = base.model.tokenizer.encode(edited["response"], add_special_tokens=False)[:c.max_new_tokens]
  full = base.encode([prompt])[0] + resp
  tokens, mask = base.batch([full], len(full), 1)
  g = gap.teacher_forced_gaps(base.model.params, tokens, mask, base.anchors, None, base.cfg)
  want = [float(x) for x in g["normalised"][0, len(full) - len(resp) - 1:len(full) - 1, 0]]
  assert reread["gaps"]["harmless"]["normalised"] == pytest.approx(want, abs=1e-4)
  assert reread["gaps"]["harmless"]["normalised"] != pytest.approx(edited["gaps"]["harmless"]["normalised"], abs=1e-3)


def test_resume_after_interruption_reproduces_the_result(full_run, model_dirs, tmp_path, monkeypatch):
  out_full, summary_full = full_run
  out = tmp_path / "run"
  calls = {"n": 0}
  real = gap_phases.ANSWERS

  def flaky(*a, **kw):
    calls["n"] += 1
    if calls["n"] == 4:
      raise KeyboardInterrupt("simulated interruption")
    return real(*a, **kw)
  monkeypatch.setattr(gap_phases, "ANSWERS", flaky)
  with pytest.raises(KeyboardInterrupt):
    gap_study.run(config(model_dirs, out))
  partial = _records(out)
  assert 0 < len(partial) < len(_records(out_full))
  with open(out / "records.jsonl", "a") as f:      # a line cut off mid-write
    f.write('{"unit": "free/aligned/none/9", "trunc')
  monkeypatch.setattr(gap_phases, "ANSWERS", real)
  summary = gap_study.run(config(model_dirs, out))
  assert _records(out) == _records(out_full)
  assert summary["groups"] == summary_full["groups"]


def test_eight_devices_equal_one(model_dirs, tmp_path):
  """Same batches (8 prompts each) on one device and split across eight."""
  gap_study.run(config(model_dirs, tmp_path / "run1", mesh_data=1, batch_size=8))
  gap_study.run(config(model_dirs, tmp_path / "run8", mesh_data=8, batch_size=8))
  a, b = _records(tmp_path / "run1"), _records(tmp_path / "run8")
  assert [r["response_tokens"] for r in a if "response_tokens" in r] == \
         [r["response_tokens"] for r in b if "response_tokens" in r]
  for ra, rb in zip(a, b):
    for lex in ra["gaps"]:
      for v, xs in ra["gaps"][lex].items():
        assert xs == pytest.approx(rb["gaps"][lex][v], abs=1e-4)


@pytest.mark.parametrize("kind", ["empty_lexicon", "unknown_model", "malformed_prompts", "long_prompt"])
def test_bad_input_is_one_line_error_and_writes_nothing(model_dirs, tmp_path, kind):
  out = tmp_path / "out"
  c = config(model_dirs, out)
  if kind == "empty_lexicon":
    p = tmp_path / "empty.tsv"
    p.write_text("# nothing here\n")
    c.lexicons = str(p)
    c.edit.lexicon = "empty"
  elif kind == "unknown_model":
    c.base = "no-such-model"
  elif kind == "malformed_prompts":
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "fine"}\n{not json\n')
    c.prompts = str(p)
  else:
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"id": "long", "prompt": "word " * 400}) + "\n")
    c.prompts = str(p)
  with pytest.raises(ValueError) as err:
    gap_study.run(c)
  assert "\n" not in str(err.value)
  assert not out.exists()


def test_report_recomputes_every_table_from_the_folder(full_run, tmp_path):
  study_checks.assert_report_recomputes(full_run[0], gap_study.report_dir, tmp_path)


def test_a_folder_of_another_config_is_not_resumed(model_dirs, full_run, tmp_path):
  """Resuming a results folder with a setting its records depend on changed (max_new_tokens,
  max_prompts) is a one-line error naming it, raised before anything loads or is written;
  keys the records do not depend on (bootstrap, mesh) resume."""
  import shutil
  out_full, _ = full_run
  out = tmp_path / "run"
  shutil.copytree(out_full, out)
  before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
  for key, value in (("max_new_tokens", 5), ("max_prompts", 6)):
    with pytest.raises(ValueError, match=f"another config \\({key}: ") as e:
      gap_study.run(config(model_dirs, out, **{key: value}))
    assert "\n" not in str(e.value) and "--config.out_dir" in str(e.value)
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
  summary = gap_study.run(config(model_dirs, out, bootstrap=100, mesh_data=2))
  assert _records(out) == _records(out_full) and summary["groups"]


def test_row_tables_share_batches_and_equal_one_condition_per_batch(model_dirs, full_run, tmp_path):
  """The edit and teacher-forced phases are row tables: with share_batches their batches mix
  conditions (sources), and the records equal one condition (source) per batch, unit names
  aside, bitwise (greedy tokens, gaps, perplexities)."""
  out_full, _ = full_run
  out = tmp_path / "apart"
  gap_study.run(config(model_dirs, out, share_batches=False))
  strip = lambda recs: sorted((json.dumps({k: v for k, v in r.items() if k != "unit"}, sort_keys=True) for r in recs))
  shared, apart = _records(out_full), _records(out)
  assert strip(shared) == strip(apart)
  for recs, mixed in ((shared, True), (apart, False)):
    for phase in ("edit", "forced"):
      per_unit = {}
      for r in recs:
        if r["phase"] == phase:
          per_unit.setdefault(r["unit"], set()).add(r["condition"])
      assert (max(map(len, per_unit.values())) > 1) == mixed, (phase, mixed)
  assert {r["condition"] for r in shared if r["phase"] == "edit"} == {"system_prompt", "logit_bias", "anchor_edit",
                                                                      "anchor_edit_random"}


def test_an_interrupted_table_resumes_row_by_row(model_dirs, full_run, tmp_path):
  """Records of a run batched another way (one condition per batch) are reused row by row in
  every phase (free, edit, forced, shift): a resumed run computes only the rows missing, and
  the records equal a fresh run's."""
  out_full, _ = full_run
  out = tmp_path / "run"
  shutil.copytree(out_full, out)
  recs = runs.ResultStore(out / "records.jsonl").records()
  ids = sorted({r["id"] for r in recs})
  drop = lambda r: ((r["phase"] == "edit" and r["condition"] == "anchor_edit")
                    or (r["phase"] == "forced" and r["condition"] == "on_base_anchor_edit")
                    or (r["phase"] == "free" and r["model"] == "aligned" and r["id"] in ids[:3])
                    or (r["phase"] == "shift" and r["id"] in ids[3:5]))
  keep = [r for r in recs if not drop(r)]
  assert sum(r["phase"] == "shift" for r in recs) == 10
  (out / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
  gap_study.run(config(model_dirs, out, share_batches=False))      # another batching: rows, not units, are reused
  after = runs.ResultStore(out / "records.jsonl").records()
  added = after[len(keep):]
  assert {(r["phase"], r["condition"]) for r in added} == {("edit", "anchor_edit"), ("forced", "on_base_anchor_edit"),
                                                           ("free", "none"), ("shift", "on_aligned")}
  assert len(added) == 2 * 10 + 3 + 2
  strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "unit"}, sort_keys=True) for r in rs)
  assert strip(after) == strip(recs)
