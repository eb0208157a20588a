"""Checkpoints named by Hugging Face hub id ('org/name', optionally 'org/name@revision'):
resolved to a snapshot directory in the local HF cache ($HF_HUB_CACHE / $HF_HOME), or
downloaded into it where the machine can reach the hub. Only what the directory loader reads
is fetched (config, safetensors, tokenizer files)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from valuedist.checkpoints.errors import LoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
            "special_tokens_map.json", "chat_template.*", "*.model"]


def is_hub_id(spec: str) -> bool:
  """'org/name' or 'org/name@revision' that is not a path on this machine."""
  return bool(HUB_ID.match(spec)) and not Path(spec).exists()


def resolve(spec: str, offline: Optional[bool] = None) -> Path:
  """The local snapshot directory of hub id `spec`: from the HF cache, else downloaded
  (unless offline, or HF_HUB_OFFLINE is set). One-line LoadError when neither works."""
  import huggingface_hub
  from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
  repo, _, revision = spec.partition("@")
  cache = os.environ.get("HF_HUB_CACHE") or huggingface_hub.constants.HF_HUB_CACHE      # read now, not at import
  kw = dict(revision=revision or None, allow_patterns=PATTERNS, cache_dir=cache)
  try:
    return Path(huggingface_hub.snapshot_download(repo, local_files_only=True, **kw))
  except (LocalEntryNotFoundError, FileNotFoundError):
    pass
  if offline is None:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
  if offline:
    raise LoadError(f"hub model {spec!r} is not in the local Hugging Face cache ({cache}) and downloads are off "
                    "(HF_HUB_OFFLINE); download it where the hub is reachable, or give a directory") from None
  try:
    return Path(huggingface_hub.snapshot_download(repo, **kw))
  except (HfHubHTTPError, OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise LoadError(f"hub model {spec!r} is not in the local Hugging Face cache ({cache}) and cannot be "
                    f"downloaded ({first}); check the id and the network, or give a directory") from None
