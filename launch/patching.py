"""Activation vs attribution patching on an embedded model. Usage: python -m launch.patching [--config.KEY=VALUE ...]"""
from ml_collections import config_flags

from launch import start
from valuedist.studies import patching

_CONFIG = config_flags.DEFINE_config_file("config", "configs/patching.py", "Example configuration.")

if __name__ == "__main__":
  start(patching.run, _CONFIG)
