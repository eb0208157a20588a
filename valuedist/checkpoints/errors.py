"""The one error type of checkpoint loading."""
from __future__ import annotations


class LoadError(ValueError):
  """A checkpoint could not be read; the message names the file and the fix."""


def one_line(e: BaseException) -> str:
  """The first line of an exception's message (its type name when it has none)."""
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__
