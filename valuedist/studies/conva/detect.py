"""Detection: the per-value answer judge and prompt-level gate, both classifiers over another
model's pooled hidden states (config.judge), their feature layers (config or 'auto', chosen
on validation groups), and the gate's open/closed decision per item."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from valuedist.data import schwartz
from valuedist.eval import judges
from valuedist.studies.conva.identify import pair_rows
from valuedist.studies.conva.inputs import Inputs
from valuedist.studies.runner import Runner
from valuedist.values import probes

JUDGE_FORMS = ("statement", "vignette")


@dataclasses.dataclass
class Detectors:
  """Per-value judge and gate classifiers over the judge model's pooled hidden states."""
  judge: probes.LinearProbe            # w [V, D]: answer leans towards value v (features at judge_layer)
  gate: probes.LinearProbe             # w [V, D]: prompt calls for value v (features at gate_layer)
  judge_layer: int
  gate_layer: int
  judge_acc: dict                      # held-out scenarios, per value
  gate_acc: dict
  layer_choice: dict                   # validation accuracy per layer that chose each layer


def layer_from_spec(spec, n_layers: int, what: str) -> Optional[int]:
  """config.judge_layer / gate_layer: 'auto' -> None, else a block index (negative counts from the end)."""
  if str(spec) == "auto":
    return None
  try:
    layer = int(spec)
  except ValueError:
    raise ValueError(f"{what} {spec!r} is neither 'auto' nor a layer number") from None
  if not -n_layers <= layer < n_layers:
    raise ValueError(f"{what} {layer} is outside the judge model's layers 0-{n_layers - 1}; choose one in range or 'auto'")
  return layer % n_layers


def _split_groups(groups: Sequence[str], frac: float, seed: int, within=None) -> np.ndarray:
  """Bool [N]: rows whose group falls in a held-out share `frac` of the groups (of the rows in
  `within`, if given), so no group is on both sides."""
  groups = np.asarray(groups)
  pool = np.unique(groups if within is None else groups[within])
  _, held = probes.split_train_test(len(pool), frac, seed)
  return np.isin(groups, pool[held]) & (True if within is None else within)


def _choose_layer(spec, problems: list, n_layers: int, c, what: str) -> tuple[int, list]:
  """The feature layer of a detector: config value, or with 'auto' the layer whose classifiers
  are most accurate, on average over `problems` [(features [L, N, D], labels, train mask, groups)],
  on a validation share of each problem's training groups (the test groups stay untouched)."""
  fixed = layer_from_spec(spec, n_layers, what)
  if fixed is not None:
    return fixed, []
  accs = []
  for x, y, train, groups in problems:
    val = _split_groups(groups, 0.25, c.probe.seed + 1, within=train)
    fit = np.flatnonzero(train & ~val)
    accs.append(judges.layer_accuracies(x, y, fit, np.flatnonzero(val), l2=c.detector_l2))
  mean = np.mean(accs, 0)
  return int(np.argmax(mean)), [round(float(a), 4) for a in mean]


def _gate_questions(inputs: Inputs) -> tuple[list[str], list[str], list[str]]:
  """(texts, value per text ('' = none), group per text) of the gate's training set: the
  question forms of every value's detector scenarios (never a probe's), the prompt set's
  value dilemmas (never a test dilemma), then the detectors' share of the neutral sentences
  and the prompt set's neutral prompts."""
  texts, value, group = [], [], []
  for v in schwartz.VALUES:
    scenarios = [s for s in inputs.scenarios if s["value"] == v and inputs.roles[s["id"]] == "detector"]
    for p in schwartz.value_pairs(v, forms=schwartz.QUESTION_FORMS, scenarios=scenarios) if scenarios else []:
      texts += [p.positive, p.negative]
      value += [v, v]
      group += [p.id.split("/")[0]] * 2
  for p in inputs.prompts:
    if p["category"] == "dilemma" and p["value"] in schwartz.VALUES:
      texts.append(p["prompt"])
      value.append(p["value"])
      group.append(p["id"])
  others = inputs.neutral_detector + [p["prompt"] for p in inputs.prompts if p["category"] == "neutral"]
  return texts + others, value + [""] * len(others), group + [f"other-{i}" for i in range(len(others))]


def judge_rows(inputs: Inputs, value: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """The judge's training rows for one value: texts, labels (1 = leans towards the value) and
  group per row (held out together): both sides of the statement and vignette pairs of the
  value's detector scenarios, then the judge's own labelled answers (inputs.judge_answers,
  grouped by question): text in the answer format the judge reads, never a probe's text nor
  a validation answer."""
  texts, y, sid = pair_rows(inputs, value, True, forms=JUDGE_FORMS, roles=("detector",))
  answers = [a for a in inputs.judge_answers if a["value"] == value]
  return (texts + [a["answer"] for a in answers],
          np.concatenate([y, np.asarray([a["label"] == "toward" for a in answers], np.int32)]),
          np.concatenate([sid, np.asarray(["answers/" + a["question"] for a in answers], dtype=object)]).astype(str))


def _detector_data(j: Runner, inputs: Inputs, c) -> tuple[dict, dict]:
  """Per value, (features [L, N, D], labels [N], train mask [N], groups [N]) of the judge
  (`judge_rows`) and
  of the gate (the value's questions against as many others: other values' questions and
  neutral text). None of it is text the probes or CAA vectors were built from."""
  texts, q_value, group = _gate_questions(inputs)
  gate_x = j.features(texts, c.batch_size, layer=None, desc="gate features")      # [L, N, D]
  q_value, group = np.asarray(q_value), np.asarray(group)
  gate_test = _split_groups(group, c.detector_test_frac, c.probe.seed)   # held out by scenario
  rng = np.random.default_rng(c.probe.seed)
  judge_data, gate_data = {}, {}
  for v in inputs.values:
    texts, y, sid = judge_rows(inputs, v)
    judge_data[v] = (j.features(texts, c.batch_size, layer=None, desc=f"judge features {v}"), y,
                     ~_split_groups(sid, c.detector_test_frac, c.probe.seed), sid)
    gy = (q_value == v).astype(np.int32)
    neg = np.flatnonzero(gy == 0)
    keep = np.sort(np.concatenate([np.flatnonzero(gy == 1), rng.choice(neg, min(len(neg), int(gy.sum())), replace=False)]))
    gate_data[v] = (gate_x[:, keep], gy[keep], ~gate_test[keep], group[keep])
  return judge_data, gate_data


def _fit_per_value(d: dict, layer: int, values: Sequence[str], c) -> tuple[probes.LinearProbe, dict]:
  """One classifier per value on `layer`'s features: held-out accuracy on the test groups,
  then refit on all rows. Returns (probe with w [V, D], {value: held-out accuracy})."""
  w, b, acc = [], [], {}
  for v in values:
    x, y, train, _ = d[v]
    x = x[layer]
    p = judges.fit_text_classifier(x[train], y[train], l2=c.detector_l2)
    acc[v] = round(float(probes.accuracy(p, x[~train], y[~train])), 4)
    p = judges.fit_text_classifier(x, y, l2=c.detector_l2)
    w.append(p.w)
    b.append(p.b)
  return probes.LinearProbe(jnp.stack(w), jnp.stack(b), layer=layer), acc


def fit_detectors(j: Runner, inputs: Inputs, c) -> Detectors:
  """Per-value judge and gate: standardised logistic classifiers over the judge model's
  mean-pooled hidden states at one layer each (config.judge_layer / gate_layer, or 'auto':
  chosen on a validation share of the training scenarios). Held-out accuracy on a share
  config.detector_test_frac of the detector groups, then refit on all of them. The judge
  separates the two sides of `judge_rows` (the value's detector statement and vignette
  pairs and its judge-only labelled answers); the gate separates the value's questions (the question forms of its pairs
  and the prompt set's dilemmas about it, none of them a test dilemma) from an equal
  number drawn from other values' questions and neutral text."""
  judge_data, gate_data = _detector_data(j, inputs, c)
  jl, j_curve = _choose_layer(c.judge_layer, list(judge_data.values()), j.cfg.n_layers, c, "judge_layer")
  gl, g_curve = _choose_layer(c.gate_layer, list(gate_data.values()), j.cfg.n_layers, c, "gate_layer")
  judge, judge_acc = _fit_per_value(judge_data, jl, inputs.values, c)
  gate, gate_acc = _fit_per_value(gate_data, gl, inputs.values, c)
  return Detectors(judge, gate, jl, gl, judge_acc, gate_acc, {"judge": j_curve, "gate": g_curve})


def gate_threshold(c, value: str) -> float:
  return float(c.gate_thresholds.get(value, c.gate_threshold)) if "gate_thresholds" in c else float(c.gate_threshold)


def gate_probabilities(j: Runner, det: Detectors, inputs: Inputs, c) -> dict[str, np.ndarray]:
  """{item id: [V] probability that each value's gate opens}, for every test dilemma and
  multiple-choice question (one pass of the gate model over each)."""
  items = [d for v in inputs.values for d in inputs.dilemmas[v]] + inputs.mc
  x = j.features([d["question"] for d in items], c.batch_size, layer=det.gate_layer, desc="gate")
  probs = np.asarray(det.gate.prob(jnp.asarray(x)))                               # [N, V]
  return {d["id"]: p for d, p in zip(items, probs)}


def gates(gate_p: dict, inputs: Inputs, items: Sequence[dict], value: str, c) -> np.ndarray:
  """[N] float 1/0: does the value's gate open for each item."""
  vi = inputs.values.index(value)
  return (np.asarray([gate_p[d["id"]][vi] for d in items]) >= gate_threshold(c, value)).astype(np.float32)


def gate_open_rates(gate_p: dict, inputs: Inputs, c) -> dict:
  """How selective the gates are: {'dilemmas': {gate value: {dilemma value: open share}},
  'mc': {gate value: open share on the multiple-choice questions}}."""
  return {"dilemmas": {g: {d: round(float(gates(gate_p, inputs, inputs.dilemmas[d], g, c).mean()), 4)
                           for d in inputs.values} for g in inputs.values},
          "mc": {g: round(float(gates(gate_p, inputs, inputs.mc, g, c).mean()), 4) if inputs.mc else None
                 for g in inputs.values}}
