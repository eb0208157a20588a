"""Tokenizers of checkpoints: loading, special token ids, and prompt encoding through the
tokenizer's chat template."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from valuedist.checkpoints.errors import LoadError, one_line as _one_line


def load_tokenizer(path):
  """Tokenizer of a HF directory or a GGUF file (transformers builds it; slow for GGUF)."""
  import transformers
  path = Path(path)
  try:
    if path.suffix == ".gguf":
      return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(str(path))
  except Exception as e:
    raise LoadError(f"{path}: cannot load the tokenizer ({_one_line(e)})") from None


def special_ids(tokenizer) -> tuple[Optional[int], tuple[int, ...], int]:
  """(bos, eos ids including chat end-of-turn tokens, pad)."""
  vocab = tokenizer.get_vocab()
  eos = [tokenizer.eos_token_id] + [vocab[t] for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>") if t in vocab]
  eos = tuple(dict.fromkeys(int(i) for i in eos if i is not None))
  pad = tokenizer.pad_token_id
  pad = int(pad if pad is not None else (eos[0] if eos else 0))
  return tokenizer.bos_token_id, eos, pad


def encode_prompt(tokenizer, prompt: str, *, chat: bool, system: str | None = None) -> list[int]:
  """Token ids of one prompt: through the tokenizer's chat template when `chat` and it has one,
  else the plain text followed by a newline (base models), with the tokenizer's BOS handling."""
  if chat and getattr(tokenizer, "chat_template", None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
      ids = ids["input_ids"]
    return list(ids)
  text = (system + "\n\n" if system else "") + prompt + "\n"
  return list(tokenizer(text)["input_ids"])


def check_lengths(token_lists: Sequence[Sequence[int]], ids: Sequence[str], limit: int) -> None:
  """One-line error if any prompt (plus what will be generated) exceeds the model context."""
  for i, toks in zip(ids, token_lists):
    if len(toks) > limit:
      raise ValueError(f"prompt {i!r} has {len(toks)} tokens, over the {limit} the model context leaves "
                       "after generation; shorten it or lower max_new_tokens")
