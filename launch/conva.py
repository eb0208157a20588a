"""Runs the ConVA study. Usage: python -m launch.conva [--config.KEY=VALUE ...]"""
from ml_collections import config_flags

from launch import start
from valuedist.studies import conva

_CONFIG = config_flags.DEFINE_config_file("config", "configs/conva.py", "Study configuration.")

if __name__ == "__main__":
  start(conva.run, _CONFIG)
