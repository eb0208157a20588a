"""Runs the value-distinction gap study. Usage: python -m launch.gap [--config.KEY=VALUE ...]"""
from ml_collections import config_flags

from launch import start
from valuedist.studies import gap

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gap.py", "Study configuration.")

if __name__ == "__main__":
  start(gap.run, _CONFIG)
