"""Runs the causal value-structure study. Usage: python -m launch.causal [--config.KEY=VALUE ...]"""
from absl import app
from ml_collections import config_flags

from valuedist import causal_study

_CONFIG = config_flags.DEFINE_config_file("config", "configs/causal.py", "Study configuration.")


def main(argv):
  del argv
  causal_study.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
