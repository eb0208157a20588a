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
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist import causal, conva, evaluation, model, runs, sae as sae_lib, sampler, sharding
from valuedist.data import load_prompts, schwartz

VALUES = schwartz.VALUES


@dataclasses.dataclass
class Inputs:
  items: list[dict]
  roles: list[dict]
  models: list[str]
  scenarios: list[dict]


def resolve_inputs(c) -> Inputs:
  items = schwartz.load_questionnaire(c.questionnaire or None, min_items=c.min_items)
  roles = schwartz.load_roles(c.roles or None)
  if c.max_roles:
    roles = roles[:c.max_roles]
  if len(roles) + 1 <= len(VALUES):
    raise ValueError(f"{len(roles)} roles for {len(VALUES)} values: the PC algorithm needs more roles than values; "
                     "add roles or raise max_roles")
  if c.sae.mode not in SAE_MODES:
    raise ValueError(f"sae.mode {c.sae.mode!r} is unknown; use one of {', '.join(SAE_MODES)}")
  if not 0 < c.alpha < 1:
    raise ValueError(f"alpha={c.alpha} is outside (0, 1); use a significance level such as 0.05")
  models = [m.strip() for m in c.models.split(",") if m.strip()]
  if not models:
    raise ValueError("config.models is empty; name at least one model spec")
  if c.reference:
    causal.reference_from_file(c.reference, VALUES, c.reference_edge_threshold)
  return Inputs(items, roles, models, schwartz.load_scenarios())


def _slug(spec: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(spec).name)


# ----------------------------------------------------------------------------- scoring

def score_prompts(store: runs.ResultStore, r: runs.Runner, inputs: Inputs, c, *, tag: str, systems: Sequence,
                  intervene=None) -> np.ndarray:
  """Expected answers [S, I] of every item under each system prompt (None = no role),
  streamed per batch under unit keys '<tag>/<batch>'; reused when already in the store."""
  option_ids = jnp.asarray(evaluation.option_token_ids(r.model.tokenizer, causal.OPTIONS))
  prompts = [{"prompt": causal.item_prompt(it)} for it in inputs.items]
  lists, where = [], []
  for s, system in enumerate(systems):
    lists += r.encode(prompts, system)
    where += [(s, i) for i in range(len(prompts))]
  runs.check_lengths(lists, [f"{tag}:{s}:{inputs.items[i]['id']}" for s, i in where], r.cfg.max_positions)
  batch = r.round_batch(c.batch_size)
  units = [(f"{tag}/{b}", idx, length) for b, (idx, length) in
           enumerate(runs.bucket_batches([len(l) for l in lists], batch, c.bucket))]
  for key, idx, length in runs.progress(units, f"scores {tag}", store.done_units(), key=lambda u: u[0]):
    tokens, mask = r.batch([lists[i] for i in idx], length, batch)
    z = evaluation.option_logits(r.model.params, r.cfg, tokens, mask, option_ids, intervene)
    e = np.asarray(causal.expected_scores(z))
    store.append([dict(unit=key, row=int(where[i][0]), item=inputs.items[where[i][1]]["id"], score=float(e[k]))
                  for k, i in enumerate(idx)])
  out = np.full((len(systems), len(inputs.items)), np.nan)
  col = {it["id"]: j for j, it in enumerate(inputs.items)}
  for rec in store.records():
    if rec["unit"].rsplit("/", 1)[0] == tag:
      out[rec["row"], col[rec["item"]]] = rec["score"]
  return out


# ----------------------------------------------------------------------------- SAE

def corpus(inputs: Inputs) -> list[str]:
  """The shipped text of the SAE corpus: prompts, dilemmas, minimal-pair sentences and roles."""
  texts = [p["prompt"] for p in load_prompts()] + [d["question"] for d in schwartz.load_dilemmas()]
  for v in VALUES:
    for p in schwartz.value_pairs(v, scenarios=inputs.scenarios):
      texts += [p.positive, p.negative]
  return texts + [r["role"] for r in inputs.roles]


def corpus_tokens(store: runs.ResultStore, r: runs.Runner, inputs: Inputs, c) -> list[list[int]]:
  """The SAE training corpus as token lists: the `corpus` texts (plain, first
  c.sae.max_tokens tokens each) plus the model's own greedy answers to the shipped prompts
  (chat-formatted prompt + answer, c.sae.corpus_new_tokens new tokens; 0 = none), which are
  generated once, streamed to the store under 'corpus/<batch>' and reused on a rerun."""
  tok = r.model.tokenizer
  lists = [list(tok(t)["input_ids"])[:c.sae.max_tokens] for t in corpus(inputs)]
  n_new = c.sae.corpus_new_tokens
  if not n_new:
    return lists
  prompts = load_prompts()
  plists = r.encode(prompts)
  batch = r.round_batch(c.batch_size)
  units = [(f"corpus/{b}", idx, length) for b, (idx, length) in
           enumerate(runs.bucket_batches([len(l) for l in plists], batch, c.bucket))]
  eos = jnp.asarray(r.model.eos_ids, jnp.int32)
  for key, idx, length in runs.progress(units, "SAE corpus: own answers", store.done_units(), key=lambda u: u[0]):
    tokens, mask = r.batch([plists[i] for i in idx], length, batch)
    g = sampler.generate(r.model.params, tokens, mask, r.cfg, max_new_tokens=n_new, eos_ids=eos,
                         pad_id=r.model.pad_id)
    out, n = np.asarray(g.tokens), np.asarray(g.lengths)
    store.append([dict(unit=key, id=prompts[i]["id"], tokens=plists[i] + out[row, :int(n[row])].tolist())
                  for row, i in enumerate(idx)])
  return lists + [rec["tokens"] for rec in store.records() if rec["unit"].startswith("corpus/")]


def token_activations(r: runs.Runner, lists: Sequence[Sequence[int]], layer: int, batch: int) -> list[np.ndarray]:
  """Residual stream after block `layer` at every real token of each token list but the
  first (and any BOS): one f32 [n_i, D] array per list.

  The first position is an attention sink whether or not it is a BOS token: in
  smollm2-135m-instruct, whose tokenizer adds no BOS, its residual norm at block 15 is ~22000
  against ~185 elsewhere, and kept in, it made the SAE's explained variance ~1.0 by itself and
  the mean residual norm (the unit of 'add' steering) 4x too large."""
  batch = r.round_batch(batch)
  out = [None] * len(lists)
  for idx, length in runs.progress(runs.bucket_batches([len(l) for l in lists], batch), "SAE activations"):
    tokens, mask = r.batch([lists[i] for i in idx], length, batch)
    h = np.asarray(sae_lib.layer_activations(r.model.params, tokens, mask, r.cfg, layer))
    m = not_sink_mask(np.asarray(tokens), np.asarray(mask), r.model.bos_id)
    for row, i in enumerate(idx):
      out[i] = h[row][m[row]]
  return out


def not_sink_mask(tokens: np.ndarray, mask: np.ndarray, bos_id) -> np.ndarray:
  """[B, T] bool: real tokens of a left-padded batch except each row's first one and any BOS."""
  m = mask.astype(bool)
  m[np.arange(len(m)), np.argmax(m, axis=1)] = False               # first real position (all-pad rows: none)
  if bos_id is not None:
    m &= tokens != bos_id
  return m


def get_sae(store: runs.ResultStore, r: runs.Runner, inputs: Inputs, c, out: Path, layer: int):
  """(SAE, quality dict, mean residual norm at the layer, [F] latents' mean active values).
  Loads c.sae.path, else trains (resumable) on the corpus and saves sae.npz. Quality is
  measured on the activations of 10% of the corpus's sequences, held out from training."""
  per_seq = token_activations(r, corpus_tokens(store, r, inputs, c), layer, c.batch_size)
  held_seq = np.random.default_rng(c.seed).random(len(per_seq)) < 0.1
  train_acts = np.concatenate([a for a, h in zip(per_seq, held_seq) if not h])
  held_acts = np.concatenate([a for a, h in zip(per_seq, held_seq) if h])
  if c.sae.path:
    s = sae_lib.check_width(sae_lib.load_sae(c.sae.path, c.sae.kind or None, c.sae.k), r.cfg.d_model, layer)
  elif (out / "sae.npz").is_file():
    s = sae_lib.load_sae(out / "sae.npz")
  else:
    s = sae_lib.train(train_acts, width=c.sae.width, k=c.sae.k, steps=c.sae.steps, batch=c.sae.batch,
                      lr=c.sae.lr, seed=c.seed, ckpt_dir=out / "sae_ckpt", ckpt_every=c.sae.ckpt_every)
    sae_lib.save_sae(out / "sae.npz", s)
  q = sae_lib.quality(s, held_acts)
  q.update(layer=layer, train_rows=len(train_acts), sequences=len(per_seq))
  return s, q, float(np.linalg.norm(train_acts, axis=-1).mean()), sae_lib.active_means(s, held_acts)


def value_feature_table(r: runs.Runner, s, inputs: Inputs, layer: int, c) -> dict:
  """{value: [(latent, score)...]}: latents separating the two sides of the value's pairs
  (last-token activations at the SAE's layer)."""
  from valuedist.conva_study import text_activations
  feats = {}
  for v in VALUES:
    pairs = schwartz.value_pairs(v, scenarios=inputs.scenarios)
    acts = text_activations(r, [p.positive for p in pairs] + [p.negative for p in pairs], c.batch_size)[layer]
    feats[v] = sae_lib.value_features(s, acts[:len(pairs)], acts[len(pairs):], top=c.sae.top_features)
  return feats


SAE_MODES = ("add", "clamp")


def sae_steering(sae, latent: int, layer: int, coef: float, n_layers: int, norm: float, active: np.ndarray,
                 mode: str):
  """(intervention, absolute strength) for one latent at one layer. 'add': the latent's
  decoder direction times coef x the layer's mean residual norm; 'clamp': the latent set to
  coef x its mean active value at every position (coef 0 ablates it)."""
  if mode == "add":
    scale = coef * norm
    return model.AddToResidual(sae_lib.steering_vectors(sae, latent, layer, n_layers),
                               jnp.asarray(scale, jnp.float32)), scale
  value = coef * float(active[latent])
  return sae_lib.ClampLatent(sae, jnp.asarray(latent), jnp.asarray(layer), jnp.asarray(value, jnp.float32)), value


# ----------------------------------------------------------------------------- report

def plot_graphs(path: Path, g: np.ndarray, stability: np.ndarray, ref_skeleton: np.ndarray, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ang = np.pi / 2 - 2 * np.pi * np.arange(len(VALUES)) / len(VALUES)
  xy = np.stack([np.cos(ang), np.sin(ang)], 1)
  fig, axes = plt.subplots(1, 2, figsize=(12, 6))
  for ax, name in zip(axes, (title, "human reference (circumplex neighbours)")):
    ax.scatter(xy[:, 0], xy[:, 1], s=900, c="#dde", zorder=2)
    for i, v in enumerate(VALUES):
      ax.text(*xy[i], v.replace("_", "\n"), ha="center", va="center", fontsize=7, zorder=3)
    ax.set_title(name)
    ax.set_aspect("equal")
    ax.axis("off")
  for i in range(len(VALUES)):
    for j in range(i + 1, len(VALUES)):
      if ref_skeleton[i, j]:
        axes[1].plot(*xy[[i, j]].T, color="grey", lw=2, zorder=1)
      if g[i, j] != 0:
        directed = (g[i, j] == -1) != (g[j, i] == -1)
        a, b = (i, j) if g[i, j] == -1 and g[j, i] == 1 else (j, i)
        lw = 0.5 + 4 * stability[i, j]
        if directed:
          axes[0].annotate("", xy=xy[b] * 0.88, xytext=xy[a] * 0.88,
                           arrowprops=dict(arrowstyle="-|>", lw=lw, color="C0"))
        else:
          axes[0].plot(*xy[[i, j]].T * 0.88, color="C0", lw=lw, zorder=1)
        mid = (xy[i] + xy[j]) / 2 * 0.88
        axes[0].text(*mid, f"{stability[i, j]:.2f}", fontsize=6, color="C3")
  runs.save_png(fig, path)


def plot_correlation(path: Path, corr: np.ndarray, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 6))
  im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
  ax.set_xticks(range(len(VALUES)), VALUES, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(VALUES)), VALUES, fontsize=8)
  for i in range(len(VALUES)):
    for j in range(len(VALUES)):
      ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=6)
  fig.colorbar(im)
  ax.set_title(title)
  runs.save_png(fig, path)


def write_scores(path: Path, scores: np.ndarray, row_names: Sequence[str]) -> None:
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["role"] + list(VALUES))
  for name, row in zip(row_names, scores):
    w.writerow([name] + [round(float(x), 5) for x in row])
  runs.atomic_write(path, buf.getvalue())


def format_report(s: dict) -> str:
  lines = [f"# Causal value structure: `{s['model']}`", "",
           f"{s['roles']} roles + no-role baseline, {s['items']} items, PC alpha {s['alpha']}, "
           f"{s['bootstrap']} bootstrap resamples.", "",
           "## Agreement with the human reference", "", "```", json.dumps(s["agreement"], indent=1), "```", "",
           "## Edges (skeleton stability)", ""]
  lines += [f"- {e['a']} {e['type']} {e['b']}: stability {e['stability']:.2f}" for e in s["edges"]] or ["- none"]
  lines += ["", "## Side effects: role prompting (best role per target value)", "",
            "| target | role | target change | mean abs non-target change | predicted | observed | precision | recall |",
            "|---|---|---|---|---|---|---|---|"]
  for t, e in s["role_steering"].items():
    lines.append(f"| {t} | {e['role']} | {e['target_change']:+.3f} | {e['mean_abs_non_target']:.3f} | "
                 f"{', '.join(e['predicted_names']) or '-'} | {', '.join(e['observed_names']) or '-'} | "
                 f"{_fmt(e['precision'])} | {_fmt(e['recall'])} |")
  if "sae" in s:
    q = s["sae"]["quality"]
    lines += ["", f"## SAE (layer {q['layer']}, width {q['width']}; steering mode '{s['sae']['mode']}')", "",
              f"MSE {q['mse']:.4g}, explained variance {q['explained_variance']:.3f}, L0 {q['l0']:.1f}, "
              f"dead latents {q['dead_share']:.3f} (held-out {q['rows']} token activations).", "",
              "| target | latent | coef | target change | mean abs non-target change | predicted | observed | precision | recall |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in s["sae"]["steering"]:
      lines.append(f"| {e['target']} | {e['latent']} | {e['coef']:+g} | {e['target_change']:+.3f} | "
                   f"{e['mean_abs_non_target']:.3f} | {', '.join(e['predicted_names']) or '-'} | "
                   f"{', '.join(e['observed_names']) or '-'} | {_fmt(e['precision'])} | {_fmt(e['recall'])} |")
  return "\n".join(lines) + "\n"


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def _named(effect: dict) -> dict:
  return dict(effect, predicted_names=[VALUES[i] for i in effect["predicted"]],
              observed_names=[VALUES[i] for i in effect["observed"]])


# ----------------------------------------------------------------------------- main

def run_model(spec: str, inputs: Inputs, c, mesh, out: Path) -> dict:
  r = runs.load_runner("model", spec, c, [], mesh)
  layer = c.sae.layer if c.sae.layer >= 0 else r.cfg.n_layers // 2
  if c.sae.enabled and not 0 <= layer < r.cfg.n_layers:
    raise ValueError(f"sae.layer {c.sae.layer} is outside the model's layers 0-{r.cfg.n_layers - 1}")
  if c.sae.enabled and c.sae.path:                 # a mismatched file fails before anything is written
    sae_lib.check_width(sae_lib.load_sae(c.sae.path, c.sae.kind or None, c.sae.k), r.cfg.d_model, layer)
  out.mkdir(parents=True, exist_ok=True)
  store = runs.ResultStore(out / "records.jsonl")
  systems = [None] + [ro["role"] for ro in inputs.roles]
  items = score_prompts(store, r, inputs, c, tag="roles", systems=systems)
  iv = [it["value"] for it in inputs.items]
  scores = causal.value_scores(items, iv)
  names = ["(no role)"] + [ro["id"] for ro in inputs.roles]
  write_scores(out / "scores.csv", scores, names)
  causal.check_scores(scores, VALUES)
  g = causal.pc_graph(scores, c.alpha)
  stab = causal.bootstrap_stability(scores, c.alpha, c.bootstrap, c.seed)
  corr = np.corrcoef(scores.T)
  ref_sign, ref_sk = (causal.reference_from_file(c.reference, VALUES, c.reference_edge_threshold) if c.reference
                      else causal.circumplex_reference())
  s = {"model": r.model.name, "roles": len(inputs.roles), "items": len(inputs.items), "alpha": c.alpha,
       "bootstrap": c.bootstrap, "no_role_scores": dict(zip(VALUES, np.round(scores[0], 4).tolist())),
       "score_sd_across_roles": dict(zip(VALUES, np.round(scores[1:].std(0), 4).tolist())),
       "correlation": np.round(corr, 4).tolist(), "graph": g.tolist(),
       "stability": np.round(stab["skeleton"], 3).tolist(),
       "agreement": causal.agreement(corr, g, ref_sign, ref_sk)}
  s["edges"] = [{"a": VALUES[i], "b": VALUES[j], "stability": float(stab["skeleton"][i, j]),
                 "type": "->" if (g[i, j] == -1 and g[j, i] == 1) else "<-" if (g[i, j] == 1 and g[j, i] == -1)
                 else "--" if g[i, j] == -1 else "<->"}
                for i in range(len(VALUES)) for j in range(i + 1, len(VALUES)) if g[i, j] != 0]
  delta = scores[1:] - scores[0]
  s["role_steering"] = {}
  for t, v in enumerate(VALUES):
    best = int(causal.rank_roles(delta, t)[0])
    s["role_steering"][v] = dict(_named(causal.side_effects(delta[best], t, g, c.side_effect_threshold)),
                                 role=inputs.roles[best]["id"])
  plot_graphs(out / "graph.png", g, stab["skeleton"], ref_sk, f"{r.model.name}: PC graph (edge width = stability)")
  plot_correlation(out / "correlation.png", corr, f"{r.model.name}: value-score correlations across roles")
  if c.sae.enabled:
    sae, q, norm, active = get_sae(store, r, inputs, c, out, layer)
    feats = value_feature_table(r, sae, inputs, layer, c)
    base_items = items[:1]
    steering = []
    for t, v in enumerate(VALUES):
      latent = feats[v][0][0]
      for coef in c.sae.coefs:
        iv_sae, scale = sae_steering(sae, latent, layer, float(coef), r.cfg.n_layers, norm, active, c.sae.mode)
        it = score_prompts(store, r, inputs, c, tag=f"sae-{c.sae.mode}/{v}/{latent}/{coef:g}", systems=[None],
                           intervene=iv_sae)
        d = (causal.value_scores(it, iv) - causal.value_scores(base_items, iv))[0]
        steering.append(dict(_named(causal.side_effects(d, t, g, c.side_effect_threshold)), target=v, latent=latent,
                             coef=float(coef), scale=scale, delta=np.round(d, 4).tolist()))
    s["sae"] = {"quality": q, "mean_residual_norm": norm, "mode": c.sae.mode, "features": feats,
                "steering": steering}
  runs.atomic_write(out / "summary.json", json.dumps(s, indent=2))
  text = format_report(s)
  runs.atomic_write(out / "report.md", text)
  print(text)
  return s


def run(c) -> dict:
  """Runs (or resumes) the study for every model in config.models; returns {model: summary}."""
  inputs = resolve_inputs(c)
  mesh = sharding.make_mesh(c.mesh_data or None)
  out = Path(c.out_dir)
  results = {}
  for spec in inputs.models:
    results[spec] = run_model(spec, inputs, c, mesh, out / _slug(spec))
  runs.atomic_write(out / "config.json", c.to_json_best_effort(indent=2))
  return results
