"""Runs the causal value-structure study. Usage: python -m launch.causal [--config.KEY=VALUE ...]"""
from ml_collections import config_flags

from launch import start
from valuedist import causal_study

_CONFIG = config_flags.DEFINE_config_file("config", "configs/causal.py", "Study configuration.")

if __name__ == "__main__":
  start(causal_study.run, _CONFIG)
