"""The causal value-structure study, per model:

  scores   the portrait questionnaire under every role (and none), scored from the option
           tokens '1'..'6' at the answer position; one streamed unit per batch
  graph    value scores centred per role -> PC (Fisher-z, causal-learn) with bootstrap edge
           stability, correlations, agreement with the human reference (circumplex or a file)
  roles    for each value, the role that moves it most against the others; predicted (graph
           descendants) vs observed side effects
  sae      a TopK SAE trained on the residual stream of one layer (or a loaded JumpReLU/TopK
           file), its quality, each value's feature from the minimal pairs, and steering by
           the feature's decoder direction: all 10 value scores per coefficient
  report   summary.json, scores.csv, report.md, graph.png, correlation.png

Modules: inputs, scoring, sae, report; `run` chains them per model. Every streamed unit's key
carries a fingerprint of what it depends on ('roles#<12 hex>/<batch>', 'corpus#.../<batch>',
'sae-<mode>/<value>/<latent>/<coef>#.../<batch>'), and sae.npz and its checkpoints are reused
only for the same fingerprint, so a changed input is recomputed, never mixed in.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from valuedist.parallel import sharding
from valuedist.studies import engine, runner
from valuedist.studies.causal.inputs import VALUES, Inputs, resolve_inputs, slug
from valuedist.studies.causal.report import format_report, named, plot_correlation, plot_graphs, write_scores
from valuedist.studies.causal.sae import sae_part
from valuedist.studies.causal.scoring import score_prompts
from valuedist.studies.runner import model_identity
from valuedist.values import causal_graph, questionnaire, sae as sae_lib


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


def role_steering(scores: np.ndarray, g: np.ndarray, inputs: Inputs, c) -> dict:
  """For each value, the role that moves it most against the others, with its predicted
  (graph descendants) and observed side effects."""
  delta = scores[1:] - scores[0]
  out = {}
  for t, v in enumerate(VALUES):
    best = int(causal_graph.rank_roles(delta, t)[0])
    out[v] = dict(named(causal_graph.side_effects(delta[best], t, g, c.side_effect_threshold)),
                  role=inputs.roles[best]["id"])
  return out


def run_model(spec: str, inputs: Inputs, c, mesh, out: Path) -> dict:
  """The whole study for one model, into folder `out`; returns its summary."""
  r = runner.load_runner("model", spec, c, [], mesh)
  layer = _sae_layer(r, c)
  out.mkdir(parents=True, exist_ok=True)
  store = engine.ResultStore(out / "records.jsonl")
  systems = [None] + [ro["role"] for ro in inputs.roles]
  items = score_prompts(store, r, inputs, c, tag="roles", systems=systems)
  scores = questionnaire.value_scores(items, [it["value"] for it in inputs.items])
  write_scores(out / "scores.csv", scores, ["(no role)"] + [ro["id"] for ro in inputs.roles])
  fields, g, stability, corr, ref_sk = graph_summary(scores, c)
  s = {"model": r.model.name, "model_fingerprint": model_identity(r)[:12], "roles": len(inputs.roles),
       "items": len(inputs.items), "alpha": c.alpha, "bootstrap": c.bootstrap, **fields,
       "role_steering": role_steering(scores, g, inputs, c)}
  plot_graphs(out / "graph.png", g, stability, ref_sk, f"{r.model.name}: PC graph (edge width = stability)")
  plot_correlation(out / "correlation.png", corr, f"{r.model.name}: value-score correlations across roles")
  if c.sae.enabled:
    s["sae"] = sae_part(store, r, inputs, c, out, layer, items, g)
  engine.atomic_write(out / "summary.json", json.dumps(s, indent=2))
  text = format_report(s)
  engine.atomic_write(out / "report.md", text)
  print(text)
  return s


def run(c) -> dict:
  """Runs (or resumes) the study for every model in config.models; returns {model: summary}."""
  inputs = resolve_inputs(c)
  mesh = sharding.make_mesh(c.mesh_data or None)
  out = Path(c.out_dir)
  results = {}
  for spec in inputs.models:
    results[spec] = run_model(spec, inputs, c, mesh, out / slug(spec))
  engine.atomic_write(out / "config.json", c.to_json_best_effort(indent=2))
  return results
