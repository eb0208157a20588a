"""Thin absl launchers: each parses --config (an ml_collections file in configs/) and calls
one study's `run(config)`."""
import sys

from absl import app, flags, logging


def start(run, config) -> None:
  """Runs `run(config.value)` under absl. Bad input, which valuedist reports as one-line
  ValueErrors, is printed as `error: ...` with exit status 2 and no traceback
  (--verbosity=1 shows it); INFO logs of jax/orbax are off unless --verbosity=0."""
  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:     # absl.app raises an unset verbosity to INFO
      logging.set_verbosity(logging.WARNING)
    try:
      run(config.value)
    except ValueError as e:
      if flags.FLAGS.verbosity >= 1:
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(main)
