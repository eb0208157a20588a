"""The causal study's inputs: config -> validated data (one-line errors before anything is written)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from valuedist import data
from valuedist.data import schwartz
from valuedist.values import causal_graph

VALUES = schwartz.VALUES
SAE_MODES = ("add", "clamp")
# SAE steering's c.sae.positions: every position, or the prompt's only, as the steered tokens'
# [start, stop) relative to the prompt's end (`edits.Where.span`)
STEERED_SPANS = {"all": (-2**30, 2**30), "prompt": (-2**30, 0)}
POSITIONS = tuple(STEERED_SPANS)


@dataclasses.dataclass
class Inputs:
  items: list[dict]
  roles: list[dict]
  models: list[str]
  scenarios: list[dict]
  prompts: list[dict]                  # SAE corpus: prompt texts and the model's own answers to them
  dilemmas: list[dict]                 # SAE corpus: dilemma questions


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
  if c.sae.positions not in POSITIONS:
    raise ValueError(f"sae.positions {c.sae.positions!r} is unknown; use one of {', '.join(POSITIONS)}")
  if not 0 <= c.sae.held_out < 1:
    raise ValueError(f"sae.held_out={c.sae.held_out} is outside [0, 1); use the share of scenarios to hold out")
  if not 0 < c.alpha < 1:
    raise ValueError(f"alpha={c.alpha} is outside (0, 1); use a significance level such as 0.05")
  models = [m.strip() for m in c.models.split(",") if m.strip()]
  if not models:
    raise ValueError("config.models is empty; name at least one model spec")
  if c.reference:
    causal_graph.reference_from_file(c.reference, VALUES, c.reference_edge_threshold)
  return Inputs(items, roles, models, schwartz.load_scenarios(c.scenarios or None), data.load_prompts(c.prompts or None),
                schwartz.load_dilemmas(c.dilemmas or None))


def slug(spec: str) -> str:
  """A model spec as a folder name."""
  return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(spec).name)
