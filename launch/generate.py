"""Greedy generation from each model, printing per-step top tokens and their logits."""
from absl import app
from ml_collections import config_flags

from valuedist import generate_demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/generate.py", "Demo configuration.")


def main(argv):
  del argv
  generate_demo.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
