"""Runs the ConVA study. Usage: python -m launch.conva [--config.KEY=VALUE ...]"""
from absl import app
from ml_collections import config_flags

from valuedist import conva_study

_CONFIG = config_flags.DEFINE_config_file("config", "configs/conva.py", "Study configuration.")


def main(argv):
  del argv
  conva_study.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
