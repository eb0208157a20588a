"""The portrait value questionnaire scored from option-token logits: the prompt of an item,
the expected answer under the softmax over the options '1'..'6', the option mass (the model's
total probability on those options, so prompts it does not answer with a number are visible),
and value scores.

Shapes: R rows (roles; row 0 may be the no-role baseline), I items, V values.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.data import schwartz

OPTIONS = ("1", "2", "3", "4", "5", "6")
QUESTION = ("Here is a description of a person.\n{text}\nHow much is this person like you? Answer with one "
            "number from 1 (not like me at all) to 6 (very much like me).")


def item_prompt(item: dict) -> str:
  return QUESTION.format(text=item["text"])


def expected_scores(option_logits: jax.Array) -> jax.Array:
  """[..., 6] logits of the options '1'..'6' -> [...] expected answer under their softmax."""
  p = jax.nn.softmax(jnp.asarray(option_logits, jnp.float32), axis=-1)
  return p @ jnp.arange(1, p.shape[-1] + 1, dtype=jnp.float32)


def option_mass(option_logprobs: jax.Array) -> jax.Array:
  """[..., 6] log p of the options '1'..'6' (each the logsumexp of its surface forms:
  `likelihood.option_logits(..., log_probs=True)`) -> [...] their total probability in [0, 1]
  at the answer position."""
  return jnp.exp(jax.nn.logsumexp(jnp.asarray(option_logprobs, jnp.float32), axis=-1))


def value_scores(item_scores: np.ndarray, item_values: Sequence[str], values: Sequence[str] = schwartz.VALUES,
                 centre: bool = True) -> np.ndarray:
  """item_scores [R, I] -> [R, V]: mean over each value's items, minus (when centre) each
  row's mean over all items, as in human scoring practice."""
  item_scores = np.asarray(item_scores, np.float64)
  iv = np.asarray(item_values)
  out = np.stack([item_scores[:, iv == v].mean(1) for v in values], 1)
  return out - item_scores.mean(1, keepdims=True) if centre else out
