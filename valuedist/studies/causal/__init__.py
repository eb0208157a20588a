"""The causal value-structure study, per model:

  scores   the portrait questionnaire under every role (and none), scored from the option
           tokens '1'..'6' at the answer position; one streamed unit per batch
  graph    value scores centred per role -> PC (Fisher-z, causal-learn) with bootstrap edge
           stability, correlations, agreement with the human reference (circumplex or a file)
  roles    held out: the graph learnt on half the roles, roles chosen per value on half the items,
           and on the other items, do the value's graph neighbours move more than the other values,
           against random graphs (graph_steering); and the older in-sample form (role_steering)
  sae      a TopK SAE trained on the residual stream of one layer (or a loaded JumpReLU/TopK
           file), its quality, each value's feature from the minimal pairs, and steering by
           the feature's decoder direction: all 10 value scores per coefficient
  report   summary.json, scores.csv, report.md, graph.png, correlation.png

Modules: inputs, scoring, sae, report; `run` chains them per model. Every streamed unit's key
carries a fingerprint of what it depends on ('roles#<12 hex>/<batch>', 'corpus#.../<batch>'),
as does each SAE-steering record's condition ('sae-<mode>/<value>/<latent>/<coef>#<12 hex>'; the
sweep is one table of rows sharing batches, `sae.steering_table`), and sae.npz and its
checkpoints are reused only for the same fingerprint, so a changed input is recomputed, never
mixed in.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from valuedist.eval import stats
from valuedist.studies import engine, runner
from valuedist.studies.causal.inputs import VALUES, Inputs, resolve_inputs, slug
from valuedist.studies.causal.report import format_report, named, plot_correlation, plot_graphs, write_scores
from valuedist.studies.causal.sae import sae_part
from valuedist.studies.causal.scoring import mass_stats, role_scores
from valuedist.studies.report import provenance
from valuedist.studies.runner import model_identity
from valuedist.values import causal_graph, questionnaire, sae as sae_lib, side_effects


def _sae_layer(r: runner.Runner, c) -> int:
  """The SAE's layer (config, -1 = the middle), with a bad layer or SAE file failing before
  anything is written."""
  layer = c.sae.layer if c.sae.layer >= 0 else r.cfg.n_layers // 2
  if c.sae.enabled and not 0 <= layer < r.cfg.n_layers:
    raise ValueError(f"sae.layer {c.sae.layer} is outside the model's layers 0-{r.cfg.n_layers - 1}")
  if c.sae.enabled and c.sae.path:                 # a mismatched file fails before anything is written
    sae_lib.check_width(sae_lib.load_sae(c.sae.path, c.sae.kind or None, c.sae.k), r.cfg.d_model, layer)
  return layer


def graph_summary(scores: np.ndarray, c) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The PC graph of value scores [1 + roles, V] with its stability, correlations and agreement
  with the reference. Returns (summary fields, graph, skeleton stability, correlation,
  reference skeleton)."""
  causal_graph.check_scores(scores, VALUES)
  g = causal_graph.pc_graph(scores, c.alpha)
  stab = causal_graph.bootstrap_stability(scores, c.alpha, c.bootstrap, c.seed)
  corr = np.corrcoef(scores.T)
  ref_sign, ref_sk = (causal_graph.reference_from_file(c.reference, VALUES, c.reference_edge_threshold)
                      if c.reference else causal_graph.circumplex_reference())
  s = {"no_role_scores": dict(zip(VALUES, np.round(scores[0], 4).tolist())),
       "score_sd_across_roles": dict(zip(VALUES, np.round(scores[1:].std(0), 4).tolist())),
       "correlation": np.round(corr, 4).tolist(), "graph": g.tolist(),
       "stability": np.round(stab["skeleton"], 3).tolist(),
       "agreement": causal_graph.agreement(corr, g, ref_sign, ref_sk)}
  chance = causal_graph.agreement_with_chance(scores, g, ref_sign, ref_sk, n_null=c.null_draws, n_boot=c.bootstrap,
                                              seed=c.seed, alpha=c.alpha)
  s.update(comparisons=chance["comparisons"], centring_floor=chance["centring_floor"], null=chance["null"])
  s["edges"] = [{"a": VALUES[i], "b": VALUES[j], "stability": float(stab["skeleton"][i, j]),
                 "type": "->" if (g[i, j] == -1 and g[j, i] == 1) else "<-" if (g[i, j] == 1 and g[j, i] == -1)
                 else "--" if g[i, j] == -1 else "<->"}
                for i in range(len(VALUES)) for j in range(i + 1, len(VALUES)) if g[i, j] != 0]
  return s, g, stab["skeleton"], corr, ref_sk


def role_steering(items: np.ndarray, scores: np.ndarray, g: np.ndarray, inputs: Inputs, c) -> dict:
  """Role steering two ways, as summary fields (items [1 + roles, I] expected answers, scores [1 + roles, V]
  their value scores, g the PC graph of all of scores; row 0 = no role):

  role_steering   {value: {role, target_change, mean_abs_non_target, predicted(_names), observed(_names),
                  precision, recall, in_sample: True}}: the role causal_graph.rank_roles puts first for the
                  value on all roles and items, with predicted (descendants in g) vs observed (|change| >=
                  side_effect_threshold) side effects. IN-SAMPLE: the role is chosen for small side effects and
                  g is learnt from the same rows, so precision / recall are biased; kept for comparison only.
  graph_steering  the held-out test (values.side_effects, whose docstring gives the splits and rules; seed
                  c.seed): roles split into a graph half A and a steering half B, items (within value) into
                  selection and measurement halves. Fields: design {seed, graph_roles, steering_roles (role
                  ids), selection_items, measurement_items (item ids)}; graph [V, V] (PC on half A + no role),
                  edges; targets [per value: target, role, selection_change, target_change (held out),
                  expected_values (graph neighbours), expected, unexpected (mean |held-out change| of the
                  neighbours / of the other non-targets), difference; None = undefined]; mean {expected,
                  unexpected, difference, targets (defined ones)}; comparisons [agreement entry of the mean
                  difference {metric, observed, chance, null_percentile, ci (bootstrap over targets),
                  null_interval} against c.null_draws random graphs with as many edges; paired entry {metric,
                  treatment, control, estimate, ci, p, p_holm, n, paired} of expected vs unexpected by
                  target]; null. Or design + skipped (the reason) when half A is too small for PC."""
  delta = scores[1:] - scores[0]
  old = {}
  for t, v in enumerate(VALUES):
    best = int(causal_graph.rank_roles(delta, t)[0])
    old[v] = dict(named(causal_graph.side_effects(delta[best], t, g, c.side_effect_threshold)),
                  role=inputs.roles[best]["id"], in_sample=True)
  return {"role_steering": old, "graph_steering": _held_out_steering(items, inputs, c)}


def _held_out_steering(items: np.ndarray, inputs: Inputs, c) -> dict:
  """values.side_effects.graph_steering with rows and items named by id, plus the paired comparison."""
  iv = [it["value"] for it in inputs.items]
  s = side_effects.graph_steering(items, iv, VALUES, alpha=c.alpha, seed=c.seed, n_null=c.null_draws,
                                  n_boot=c.bootstrap)
  d = s["design"]
  role = [None] + [ro["id"] for ro in inputs.roles]                  # item-matrix row -> role id
  s["design"] = {"seed": d["seed"], "graph_roles": [role[r] for r in d["graph_rows"]],
                 "steering_roles": [role[r] for r in d["steering_rows"]],
                 **{k: [inputs.items[j]["id"] for j in d[k]] for k in ("selection_items", "measurement_items")}}
  if "skipped" in s:
    return s
  for e in s["targets"]:
    e["role"] = role[e.pop("row")]
  ok = [e for e in s["targets"] if e["difference"] is not None]
  if ok:                                                             # one row per defined target
    s["comparisons"] += stats.with_holm([stats.comparison(
        "held_out_abs_value_change", "graph neighbours of the target (expected)",
        "other non-target values (unexpected)", [e["expected"] for e in ok], [e["unexpected"] for e in ok],
        n=c.null_draws, seed=c.seed)])
  return s


def _all_comparisons(s: dict) -> list[dict]:
  """The summary's `comparisons` (STUDY_PROTOCOL rule 13): every agreement entry {metric, observed,
  chance, null_percentile, ci} (graph vs the human reference, held-out graph steering) and every
  paired entry {metric, treatment, control, estimate, ci, p, p_holm, n, paired} (held-out graph
  steering, SAE feature vs its random direction), Holm over all paired entries together."""
  found = s["comparisons"] + s["graph_steering"].get("comparisons", []) + s.get("sae", {}).get("comparisons", [])
  paired = stats.with_holm([{k: v for k, v in e.items() if k != "p_holm"} for e in found if "paired" in e])
  return [e for e in found if "paired" not in e] + paired


def run_model(spec: str, inputs: Inputs, c, mesh, out: Path) -> dict:
  """The whole study for one model, into folder `out`; returns its summary."""
  r = runner.load_runner("model", spec, c, [], mesh)
  layer = _sae_layer(r, c)
  out.mkdir(parents=True, exist_ok=True)
  store = engine.ResultStore(out / "records.jsonl")
  items, mass = role_scores(store, r, inputs, c, with_mass=True)
  scores = questionnaire.value_scores(items, [it["value"] for it in inputs.items])
  write_scores(out / "scores.csv", scores, ["(no role)"] + [ro["id"] for ro in inputs.roles])
  fields, g, stability, corr, ref_sk = graph_summary(scores, c)
  s = {"model": r.model.name, "model_fingerprint": model_identity(r)[:12], "provenance": provenance({"model": r.model}),
       "roles": len(inputs.roles),
       "items": len(inputs.items), "alpha": c.alpha, "bootstrap": c.bootstrap, **fields,
       **role_steering(items, scores, g, inputs, c),
       "option_mass": {"no role": mass_stats(mass[:1], inputs.items), "roles": mass_stats(mass[1:], inputs.items)}}
  plot_graphs(out / "graph.png", g, stability, ref_sk, f"{r.model.name}: PC graph (edge width = stability)")
  plot_correlation(out / "correlation.png", corr, f"{r.model.name}: value-score correlations across roles")
  if c.sae.enabled:
    s["sae"] = sae_part(store, r, inputs, c, out, layer, items, g)
  s["comparisons"] = _all_comparisons(s)
  engine.atomic_write(out / "summary.json", json.dumps(s, indent=2))
  text = format_report(s)
  engine.atomic_write(out / "report.md", text)
  print(text)
  return s


@engine.on_study_mesh
def run(c, mesh) -> dict:
  """Runs (or resumes) the study for every model in config.models; returns {model: summary}."""
  inputs = resolve_inputs(c)
  out = Path(c.out_dir)
  results = {}
  for spec in inputs.models:
    results[spec] = run_model(spec, inputs, c, mesh, out / slug(spec))
  engine.atomic_write(out / "config.json", c.to_json_best_effort(indent=2))
  return results
