"""The ConVA study: identify value vectors with probes on context-controlled minimal pairs,
then steer with gated minimal activation and compare it with prompting, CAA and
anchor-word editing on held-out dilemmas, fluency and multiple-choice capability.

Stages (artefacts under config.out_dir; every generation unit streams to records.jsonl):
  identify  last-token activations of every layer for the minimal pairs (context-controlled
            and not), one L-BFGS probe per value and layer (70/30 split by scenario),
            probes saved with orbax, accuracies to probe_accuracy.{json,csv,png}; CAA vectors
  detect    on another model (config.judge): a value judge per value (answers lean towards /
            away from the value; trained on the pairs' statements) and a prompt-level gate
            per value (is this question about the value; trained on the pairs' questions)
  sweep     per value x method x setting x prefix (none / opposite): greedy answers to the
            value's dilemmas, perplexity under the unsteered model; multiple-choice accuracy
  report    control success (judge), fluency, MC accuracy per method: summary.json,
            results.csv, report.md, control_vs_fluency.png, control_by_value.png

One module per stage: inputs (config -> data and conditions), identify, detect (judge and
gate classifiers), sweep, judge (scoring the answers), report; `run` chains them.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from valuedist import data
from valuedist.studies import engine, runner
from valuedist.studies.conva.detect import fit_detectors, gate_open_rates, gate_probabilities, layer_from_spec
from valuedist.studies.conva.identify import identify, write_probe_accuracy
from valuedist.studies.conva.inputs import check_prompt_lengths, resolve_inputs, resolve_layers, split_summary
from valuedist.studies.conva.judge import answer_scores, judge_answer_accuracy, judge_records
from valuedist.studies.conva.report import RECORD_KEY, plot_results, summarise, write_report
from valuedist.studies.conva.sweep import sweep_dilemmas, sweep_mc
from valuedist.studies.report import provenance


def _load_models(inputs, c, mesh):
  """(steered model, judge/gate model, answer judge model), with every config check that
  needs a model done before anything is written."""
  lexicons = [data.load_lexicon(v) for v in inputs.values] if "anchor" in inputs.methods else []
  r = runner.load_runner("steered", c.model, c, lexicons, mesh)
  resolve_layers(c, r.cfg.n_layers)                    # bad ranges and lengths fail before anything is written
  check_prompt_lengths(r, inputs, c)
  j = runner.load_runner("judge", c.judge, c, [], mesh)
  jr = j if c.judge_kind == "classifier" or c.llm_judge in ("", c.judge) else \
      runner.load_runner("llm_judge", c.llm_judge, c, [], mesh)
  for what in ("judge_layer", "gate_layer"):
    layer_from_spec(c[what], j.cfg.n_layers, what)
  return r, j, jr


# Config keys the sweep's records do not depend on: the answer judge (its scores are a store of
# their own, keyed by the judge), the statistics, and how rows share batches (they are reused
# row by row however they were batched).
RECORDS_DO_NOT_DEPEND_ON = ("judge_kind", "llm_judge", "llm_judge_options", "judge_threshold", "bootstrap",
                            "share_batches")


@engine.on_study_mesh
def run(c, mesh) -> dict:
  """Runs (or resumes) the whole ConVA study described by config `c`; returns the summary."""
  engine.check_resume(Path(c.out_dir), c, RECORDS_DO_NOT_DEPEND_ON)     # before any model loads
  inputs = resolve_inputs(c)
  r, j, jr = _load_models(inputs, c, mesh)
  out = Path(c.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  engine.atomic_write(out / "config.json", c.to_json_best_effort(indent=2))
  ident = identify(r, inputs, c, out)
  acc_table = write_probe_accuracy(out, ident, c)
  det = fit_detectors(j, inputs, c)
  store = engine.ResultStore(out / "records.jsonl")
  gate_p = gate_probabilities(j, det, inputs, c)
  sweep_dilemmas(store, r, gate_p, ident, inputs, c)
  sweep_mc(store, r, gate_p, ident, inputs, c)
  records = engine.in_key_order(store.records(), RECORD_KEY)
  judge_file = judge_records(out, jr, det, inputs, records, c)
  facts = {"model": r.model.name, "judge_model": j.model.name, "judge_kind": c.judge_kind,
           "answer_judge_model": jr.model.name, "judge_scores": judge_file.name,
           "anchor_coverage": r.coverage,
           "provenance": provenance({"steered": r.model, "judge": j.model, "answer_judge": jr.model}),
           "splits": split_summary(inputs, c),
           "judge_accuracy": det.judge_acc, "gate_accuracy": det.gate_acc,
           "judge_layer": det.judge_layer, "gate_layer": det.gate_layer,
           "detector_layer_choice": det.layer_choice,
           "judge_on_labelled_answers": judge_answer_accuracy(jr, det, inputs, c),
           "gate_open_rates": gate_open_rates(gate_p, inputs, c),
           "probe_accuracy": acc_table}
  engine.atomic_write(out / "facts.json", json.dumps(facts, indent=2))
  return report_dir(out)


def report_dir(out) -> dict:
  """Recomputes summary.json, results.csv, report.md and the plots of a finished run from its
  folder alone (config.json, records.jsonl, the judge's score file, facts.json)."""
  out = Path(out)
  c = ml_collections.ConfigDict(json.loads((out / "config.json").read_text()))
  facts = json.loads((out / "facts.json").read_text())
  records = engine.in_key_order(engine.ResultStore(out / "records.jsonl").records(), RECORD_KEY)
  fields, scores = answer_scores(engine.ResultStore(out / facts["judge_scores"]).records())
  for rec in records:
    if rec["kind"] == "dilemma":
      rec["toward"] = scores[tuple(rec[k] for k in fields)]
  values = list(facts["probe_accuracy"])
  s = summarise(records, values, c, facts)
  engine.atomic_write(out / "summary.json", json.dumps(s, indent=2))
  text = write_report(out, s)
  plot_results(out, s, values)
  print(text)
  return s
