"""Runs the causal value-structure study. Usage: python -m launch.causal [--config.KEY=VALUE ...]"""
from ml_collections import config_flags

from launch import start
from valuedist.studies import causal

_CONFIG = config_flags.DEFINE_config_file("config", "configs/causal.py", "Study configuration.")

if __name__ == "__main__":
  start(causal.run, _CONFIG)
