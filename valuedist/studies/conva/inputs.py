"""The ConVA study's inputs and conditions: config -> validated data (one-line errors before
anything is written), layer ranges, and the steering conditions of the sweep."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from valuedist import data
from valuedist.checkpoints.tokenizer import check_lengths
from valuedist.data import schwartz
from valuedist.studies.runner import Runner, check_generation_config
from valuedist.values import conva

METHODS = ("none", "prompt", "caa", "anchor", "conva")
CONTROLLED = ("caa", "anchor", "conva")     # methods that edit activations: each gets a matched random-direction control
PREFIXES = ("none", "opposite")
JUDGE_KINDS = ("classifier", "llm")
GATINGS = ("gated", "ungated", "both")
ROLES = ("train", "val", "test", "detector")      # what each scenario is used for (split per value)


@dataclasses.dataclass
class Inputs:
  values: list[str]
  scenarios: list[dict]
  dilemmas: dict[str, list[dict]]
  prefixes: dict[str, dict]
  mc: list[dict]
  neutral: list[str]
  answers: list[dict]                  # labelled answers that validate the judge (never fit it)
  judge_answers: list[dict]            # labelled answers the judge is trained on (disjoint questions)
  methods: list[str]
  p0s: list[float]
  prompts: list[dict]                  # the shipped-format prompt set: its value dilemmas join the gate's positives
  roles: dict[str, str]                # scenario id -> one of ROLES (see `split_scenarios`)
  neutral_detector: list[str]          # neutral sentences for the gate, disjoint from `neutral` (probes)


def floats(x, what: str) -> list[float]:
  items = [s for s in str(x).split(",") if s.strip()] if isinstance(x, str) else list(x)
  try:
    return [float(v) for v in items]
  except ValueError:
    raise ValueError(f"{what} {x!r} is not a list of numbers; write e.g. 0.9,0.99") from None


def resolve_inputs(c) -> Inputs:
  """Validates everything the run reads before anything is written (one-line errors)."""
  values = schwartz.check_values(c.target_values)
  methods = [m.strip() for m in c.methods.split(",") if m.strip()]
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    raise ValueError(f"unknown method(s) {bad or c.methods!r}; use some of {', '.join(METHODS)}")
  p0s = [conva.check_p0(p) for p in floats(c.p0s, "p0s")]
  scenarios = schwartz.load_scenarios(c.scenarios or None)
  for v in values:
    if not any(s["value"] == v for s in scenarios):
      raise ValueError(f"the pair file has no scenarios for value {v!r}; add some or drop it from config.target_values")
  dilemmas = {v: [] for v in values}
  for d in schwartz.load_dilemmas(c.dilemmas or None):
    if d["value"] in dilemmas:
      dilemmas[d["value"]].append(d)
  for v in values:
    if not dilemmas[v]:
      raise ValueError(f"the dilemma file has no dilemmas for value {v!r}; add some or drop it from config.target_values")
    if c.max_dilemmas:
      dilemmas[v] = dilemmas[v][:c.max_dilemmas]
  mc = schwartz.load_general_mc(c.mc or None)
  if c.max_mc:
    mc = mc[:c.max_mc]
  check_generation_config(c)
  floats(c.caa_coefs, "caa_coefs")
  for what in ("judge_layer", "gate_layer"):
    if str(c[what]) != "auto" and not str(c[what]).lstrip("-").isdigit():
      raise ValueError(f"{what} {c[what]!r} is neither 'auto' nor a layer number")
  if c.judge_kind not in JUDGE_KINDS:
    raise ValueError(f"judge_kind {c.judge_kind!r} is unknown; use one of {', '.join(JUDGE_KINDS)}")
  llm_judge_options(c)
  if c.gating not in GATINGS:
    raise ValueError(f"gating {c.gating!r} is unknown; use one of {', '.join(GATINGS)}")
  answers = schwartz.load_answers(c.answers or None)
  judge_answers = [] if c.judge_answers == "none" else schwartz.load_answers(c.judge_answers or schwartz.JUDGE_ANSWERS_FILE)
  shared = {a["question"] for a in answers} & {a["question"] for a in judge_answers}
  if shared:
    raise ValueError(f"{len(shared)} question(s) are both in the judge's training answers and its validation answers "
                     f"(e.g. {sorted(shared)[0]!r}); keep the two files disjoint")
  neutral = schwartz.load_neutral(c.neutral or None)
  held = np.random.default_rng([c.probe.seed, 1]).random(len(neutral)) < c.probe.detector_frac
  return Inputs(values, scenarios, dilemmas, schwartz.load_prefixes(c.prefixes or None), mc,
                [t for t, h in zip(neutral, held) if not h], answers, judge_answers, methods, p0s,
                data.load_prompts(c.prompts or None), split_scenarios(scenarios, c),
                [t for t, h in zip(neutral, held) if h])


def split_scenarios(scenarios: list[dict], c) -> dict[str, str]:
  """Scenario id -> role, drawn per value with seed config.probe.seed: a share
  probe.detector_frac trains the judge and gate only (never the probes or CAA vectors), and
  the rest is split into probe train / validation (every choice) / test (read once, for the
  reported figures) by probe.val_frac and probe.test_frac of all the value's scenarios."""
  f = c.probe
  out = {}
  for v in sorted({s["value"] for s in scenarios}):
    ids = sorted(s["id"] for s in scenarios if s["value"] == v)
    n = len(ids)
    k = [max(1, round(n * x)) for x in (f.detector_frac, f.test_frac, f.val_frac)]
    if n - sum(k) < 1:
      raise ValueError(f"value {v!r} has {n} scenarios, too few for detector/test/validation/train splits; "
                       "add scenarios or lower probe.detector_frac, test_frac, val_frac")
    order = [ids[i] for i in np.random.default_rng([f.seed, schwartz.VALUES.index(v)]).permutation(n)]
    roles = ["detector"] * k[0] + ["test"] * k[1] + ["val"] * k[2] + ["train"] * (n - sum(k))
    out.update(zip(order, roles))
  return out


def split_summary(inputs: Inputs, c) -> dict:
  """The scenario split as reported: seed, fractions and, per value, the scenario ids of each role."""
  by_value: dict = {}
  for s in inputs.scenarios:
    by_value.setdefault(s["value"], {r: [] for r in ROLES})[inputs.roles[s["id"]]].append(s["id"])
  return {"seed": c.probe.seed, "detector_frac": c.probe.detector_frac, "val_frac": c.probe.val_frac,
          "test_frac": c.probe.test_frac, "roles": by_value}


def resolve_layers(c, n_layers: int, vp: Optional[conva.ValueProbes] = None,
                   value: str = "") -> list[tuple[str, Optional[tuple[int, ...]]]]:
  """config.layers ('auto' or comma list of 'a-b') -> [(spec, steered layers)]. 'auto' is the
  published rule on the value's *validation* accuracy (`conva.choose_layers` with
  config.layer_threshold and layer_exclude_last; None until probes `vp` are given)."""
  specs = [s.strip() for s in str(c.layers).split(",") if s.strip()]
  if not specs:
    raise ValueError("config.layers is empty; write 'auto' or ranges such as '8-12,14-18'")
  out = []
  for s in specs:
    if s == "auto":
      out.append((s, None if vp is None else conva.choose_layers(vp.val_acc[vp.index(value)], c.layer_threshold,
                                                                 c.layer_exclude_last)[0]))
    else:
      first, last = conva.parse_layers(s, n_layers)
      out.append((s, tuple(range(first, last + 1))))
  return out


def llm_judge_options(c) -> tuple[str, str]:
  """The LLM judge's two answers (config.llm_judge_options, e.g. 'Yes,No')."""
  opts = [o.strip() for o in str(c.llm_judge_options).split(",")]
  if len(opts) != 2 or not all(opts):
    raise ValueError(f"llm_judge_options {c.llm_judge_options!r} must name two answers, e.g. 'Yes,No'")
  return opts[0], opts[1]


@dataclasses.dataclass(frozen=True)
class Condition:
  """One steering method with its setting; `name` keys records and tables. `layer_spec` is
  the configured range ('auto' or 'a-b'), `layers` the steered layers for the current value;
  `gated`: the method acts only where the value's prompt gate opens (every method alike:
  prompting adds its system prompt, the edits edit, only there). `control`: the method's
  matched random-direction control (same norms at the same sites, `values.controls`)."""
  method: str
  layer_spec: Optional[str] = None
  layers: Optional[tuple[int, ...]] = None
  p0: Optional[float] = None
  coef: Optional[float] = None
  gated: bool = False
  control: bool = False

  @property
  def name(self) -> str:
    s = self.method
    if self.layer_spec is not None:
      s += f"@{self.layer_spec}"
    if self.p0 is not None:
      s += f",p0={self.p0:g}"
    if self.coef is not None:
      s += f",coef={self.coef:g}"
    if self.control:
      s += ",random"
    if self.method != "none" and not self.gated:
      s += ",ungated"
    return s


def conditions(c, inputs: Inputs, n_layers: int, vp: conva.ValueProbes, value: str) -> list[Condition]:
  """Every condition of the sweep for one value: 'none', then each method and setting, gated
  and/or ungated (config.gating), each edit followed by its matched random-direction control
  (config.controls)."""
  ranges = resolve_layers(c, n_layers, vp, value)
  gatings = {"gated": (True,), "ungated": (False,), "both": (True, False)}[c.gating]
  out = []
  for m in inputs.methods:
    if m in ("none", "prompt", "anchor"):
      settings = [Condition(m)]
    elif m == "caa":
      settings = [Condition(m, spec, lr, coef=k) for spec, lr in ranges for k in floats(c.caa_coefs, "caa_coefs")]
    else:
      settings = [Condition(m, spec, lr, p0=p) for spec, lr in ranges for p in inputs.p0s]
    if m in CONTROLLED and c.controls:
      settings = [x for s in settings for x in (s, dataclasses.replace(s, control=True))]
    out += settings if m == "none" else [dataclasses.replace(s, gated=g) for s in settings for g in gatings]
  return out


def system_prompt(cond: Condition, prefix: str, prefixes: dict, gate_open: bool = True) -> Optional[str]:
  """The system prompt of one item: the opposite prefix when asked, plus (prompting) the
  value's high prefix where the method acts (gate open, or ungated)."""
  high = cond.method == "prompt" and (gate_open or not cond.gated)
  parts = ([prefixes["opposite"]] if prefix == "opposite" else []) + ([prefixes["high"]] if high else [])
  return " ".join(parts) or None


def check_prompt_lengths(r: Runner, inputs: Inputs, c) -> None:
  """Every dilemma under its longest system prompt (opposite + high prefix) must leave room
  for max_new_tokens; one-line error otherwise."""
  for v in inputs.values:
    system = system_prompt(Condition("prompt"), "opposite" if c.robustness else "none", inputs.prefixes[v])
    lists = r.encode(inputs.dilemmas[v], system, key="question")
    check_lengths(lists, [p["id"] for p in inputs.dilemmas[v]], r.cfg.max_positions - c.max_new_tokens)
