"""Host-side batch layout of token lists: left/right padding into fixed shapes, and the
round-up that keeps the number of compiled shapes small."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def round_up(x: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= x (batch sizes, padded lengths)."""
  return -(-x // multiple) * multiple


def pack_left(token_lists: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0):
  """Left-padded tokens, mask [batch, length] (rows beyond the lists are all padding)."""
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for r, toks in enumerate(token_lists):
    if toks:
      tokens[r, length - len(toks):] = toks
      mask[r, length - len(toks):] = 1
  return tokens, mask


def pack_right(token_lists: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0):
  """Right-padded tokens, mask [batch, length]."""
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for r, toks in enumerate(token_lists):
    toks = list(toks)[:length]
    tokens[r, :len(toks)] = toks
    mask[r, :len(toks)] = 1
  return tokens, mask
