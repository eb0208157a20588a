"""Greedy generation from each model, printing per-step top tokens and their logits."""
from ml_collections import config_flags

from launch import start
from valuedist.studies import generate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/generate.py", "Study configuration.")

if __name__ == "__main__":
  start(generate.run, _CONFIG)
