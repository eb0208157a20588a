"""Anchor words -> token ids, per tokenizer, packed for jitted gap computation.

A word is looked up in the surface forms a model actually emits: as is, with a leading
space, and capitalised (with and without the space). Each form contributes its first
token (for multi-token words, the first piece). Ids that fall on both sides of a lexicon
are dropped, since they cannot separate the sides.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct


def surface_forms(word: str) -> tuple[str, ...]:
  cap = word[:1].upper() + word[1:]
  return tuple(dict.fromkeys((word, " " + word, cap, " " + cap)))


@dataclasses.dataclass(frozen=True)
class SideCoverage:
  words: int
  words_single_token: int     # words with at least one surface form that is one token
  words_multi_token: int      # words seen only as longer tokenisations
  ids: int                    # distinct ids kept for this side
  dropped_pieces: tuple = ()  # first pieces of multi-token words left out (e.g. ' un', ' dis')


def _piece(tokenizer, i: int) -> str:
  decode = getattr(tokenizer, "decode", None)
  return decode([i]) if decode else str(i)


def word_ids(tokenizer, words: Sequence[str], first_pieces: bool = False) -> tuple[set[int], SideCoverage]:
  """Anchor ids of every surface form of every word, and how the words tokenised.

  A form that is one token contributes that token. A form split into several tokens
  contributes its first piece only with `first_pieces`: such pieces are rarely words of
  their own (' un', ' dis', ' in' start 56 negative-side words), so by default they are
  dropped and listed in the coverage report."""
  ids: set[int] = set()
  pieces: set[int] = set()
  single = multi = 0
  for w in words:
    lengths = []
    for form in surface_forms(w):
      toks = tokenizer.encode(form, add_special_tokens=False)
      if not toks:
        continue
      lengths.append(len(toks))
      if len(toks) == 1 or first_pieces:
        ids.add(int(toks[0]))
      else:
        pieces.add(int(toks[0]))
    if lengths and min(lengths) == 1:
      single += 1
    elif lengths:
      multi += 1
  dropped = tuple(sorted(_piece(tokenizer, i) for i in pieces - ids))
  return ids, SideCoverage(len(words), single, multi, 0, dropped)


class Anchors(struct.PyTreeNode):
  """Anchor ids of G lexicons. ids: [G, 2, K] int32 (side 0 positive, 1 negative, padded with 0);
  mask: [G, 2, K] bool; names: lexicon names (static); vocab: the model's vocabulary size
  (static), so logits padded past it (a model-parallel layout) stay out of the gap's
  vocabulary moments; 0 = every logit column is a token."""
  ids: jnp.ndarray
  mask: jnp.ndarray
  names: tuple[str, ...] = struct.field(pytree_node=False, default=())
  vocab: int = struct.field(pytree_node=False, default=0)

  @property
  def size(self) -> int:
    return len(self.names)

  def select(self, name: str) -> "Anchors":
    i = self.names.index(name)
    return Anchors(self.ids[i:i + 1], self.mask[i:i + 1], (name,), self.vocab)


def build_anchors(tokenizer, lexicons, first_pieces: bool = False, vocab: int = 0) -> tuple[Anchors, dict[str, dict]]:
  """Lexicons (objects with .name, .positive, .negative) -> (Anchors, coverage report by name).
  `first_pieces` also maps multi-token words to their first piece (see `word_ids`); `vocab`:
  the model's vocabulary size (`Anchors.vocab`).

  Raises ValueError (one line) if a lexicon keeps no token on either side for this tokenizer.
  """
  sides, report = [], {}
  for lex in lexicons:
    pos, cov_p = word_ids(tokenizer, lex.positive, first_pieces)
    neg, cov_n = word_ids(tokenizer, lex.negative, first_pieces)
    shared = pos & neg
    pos, neg = sorted(pos - shared), sorted(neg - shared)
    if not pos or not neg:
      side = "positive" if not pos else "negative"
      raise ValueError(f"lexicon {lex.name!r} maps to no {side} anchor token for this tokenizer "
                       f"({len(shared)} ids were shared by both sides, multi-token words are left out unless "
                       "first_pieces is set); add single-token words to that side")
    report[lex.name] = {
        "positive": dataclasses.asdict(dataclasses.replace(cov_p, ids=len(pos))),
        "negative": dataclasses.asdict(dataclasses.replace(cov_n, ids=len(neg))),
        "dropped_shared_ids": len(shared)}
    sides.append((pos, neg))
  k = max(max(len(p), len(n)) for p, n in sides)
  ids = np.zeros((len(sides), 2, k), np.int32)
  mask = np.zeros((len(sides), 2, k), bool)
  for g, (p, n) in enumerate(sides):
    for s, lst in enumerate((p, n)):
      ids[g, s, :len(lst)] = lst
      mask[g, s, :len(lst)] = True
  return Anchors(jnp.asarray(ids), jnp.asarray(mask), tuple(l.name for l in lexicons), vocab), report
