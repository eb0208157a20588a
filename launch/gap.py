"""Runs the value-distinction gap study. Usage: python -m launch.gap [--config.KEY=VALUE ...]"""
from absl import app
from ml_collections import config_flags

from valuedist import gap_study

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gap.py", "Study configuration.")


def main(argv):
  del argv
  gap_study.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
