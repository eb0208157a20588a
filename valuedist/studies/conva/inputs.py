"""The ConVA study's inputs and conditions: config -> validated data (one-line errors before
anything is written), layer ranges, and the steering conditions of the sweep."""
from __future__ import annotations

import dataclasses
from typing import Optional

from valuedist import data
from valuedist.checkpoints.tokenizer import check_lengths
from valuedist.data import schwartz
from valuedist.studies.runner import Runner, check_generation_config
from valuedist.values import conva

METHODS = ("none", "prompt", "caa", "anchor", "conva")
PREFIXES = ("none", "opposite")
JUDGE_KINDS = ("classifier", "llm")


@dataclasses.dataclass
class Inputs:
  values: list[str]
  scenarios: list[dict]
  dilemmas: dict[str, list[dict]]
  prefixes: dict[str, dict]
  mc: list[dict]
  neutral: list[str]
  answers: list[dict]
  methods: list[str]
  p0s: list[float]
  prompts: list[dict]                  # the shipped-format prompt set: its value dilemmas join the gate's positives


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
  return Inputs(values, scenarios, dilemmas, schwartz.load_prefixes(c.prefixes or None), mc,
                schwartz.load_neutral(c.neutral or None), schwartz.load_answers(c.answers or None), methods, p0s,
                data.load_prompts(c.prompts or None))


def resolve_layers(c, n_layers: int, vp: Optional[conva.ValueProbes] = None,
                   value: str = "") -> list[tuple[str, Optional[tuple[int, int]]]]:
  """config.layers ('auto' or comma list of 'a-b') -> [(spec, (first, last))]; 'auto' picks
  the config.auto_width consecutive layers with the best controlled test accuracy for the
  value (None until probes `vp` are given)."""
  specs = [s.strip() for s in str(c.layers).split(",") if s.strip()]
  if not specs:
    raise ValueError("config.layers is empty; write 'auto' or ranges such as '8-12,14-18'")
  out = []
  for s in specs:
    if s == "auto":
      out.append((s, vp.best_layers(value, c.auto_width) if vp is not None else None))
    else:
      out.append((s, conva.parse_layers(s, n_layers)))
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
  the configured range ('auto' or 'a-b'), `layers` its (first, last) for the current value."""
  method: str
  layer_spec: Optional[str] = None
  layers: Optional[tuple[int, int]] = None
  p0: Optional[float] = None
  coef: Optional[float] = None

  @property
  def name(self) -> str:
    s = self.method
    if self.layer_spec is not None:
      s += f"@{self.layer_spec}"
    if self.p0 is not None:
      s += f",p0={self.p0:g}"
    if self.coef is not None:
      s += f",coef={self.coef:g}"
    return s


def conditions(c, inputs: Inputs, n_layers: int, vp: conva.ValueProbes, value: str) -> list[Condition]:
  ranges = resolve_layers(c, n_layers, vp, value)
  out = []
  for m in inputs.methods:
    if m in ("none", "prompt", "anchor"):
      out.append(Condition(m))
    elif m == "caa":
      out += [Condition(m, spec, lr, coef=k) for spec, lr in ranges for k in floats(c.caa_coefs, "caa_coefs")]
    else:
      out += [Condition(m, spec, lr, p0=p) for spec, lr in ranges for p in inputs.p0s]
  return out


def system_prompt(cond: Condition, prefix: str, prefixes: dict) -> Optional[str]:
  parts = ([prefixes["opposite"]] if prefix == "opposite" else []) + ([prefixes["high"]] if cond.method == "prompt" else [])
  return " ".join(parts) or None


def check_prompt_lengths(r: Runner, inputs: Inputs, c) -> None:
  """Every dilemma under its longest system prompt (opposite + high prefix) must leave room
  for max_new_tokens; one-line error otherwise."""
  for v in inputs.values:
    system = system_prompt(Condition("prompt"), "opposite" if c.robustness else "none", inputs.prefixes[v])
    lists = r.encode(inputs.dilemmas[v], system, key="question")
    check_lengths(lists, [p["id"] for p in inputs.dilemmas[v]], r.cfg.max_positions - c.max_new_tokens)
