"""Thin absl launchers: each parses --config (an ml_collections file in configs/) and calls
one study's `run(config)`, after starting jax.distributed when the run spans several
processes (--coordinator/--num_processes/--process_id, or auto-detected on a TPU pod slice,
SLURM or MPI cluster; see valuedist.parallel.hosts)."""
import sys

from absl import app, flags, logging

_COORDINATOR = flags.DEFINE_string("coordinator", "", "HOST:PORT of process 0 for a multi-process run "
                                   "(CPU or manual clusters; TPU pod slices are detected without it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run (with --coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index, 0..num_processes-1 (with --coordinator).")
_DISTRIBUTED = flags.DEFINE_boolean("distributed", False, "Start jax.distributed with JAX's cluster detection "
                                    "(TPU pod slices, SLURM, MPI) even where valuedist does not detect the cluster.")


def start(run, config) -> None:
  """Runs `run(config.value)` under absl. Bad input, which valuedist reports as one-line
  ValueErrors, is printed as `error: ...` with exit status 2 and no traceback
  (--verbosity=1 shows it); INFO logs of jax/orbax are off unless --verbosity=0."""
  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:     # absl.app raises an unset verbosity to INFO
      logging.set_verbosity(logging.WARNING)
    try:
      from valuedist.parallel import hosts
      if hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value):
        logging.warning(hosts.process_summary("jax.distributed"))
      run(config.value)
    except ValueError as e:
      if flags.FLAGS.verbosity >= 1:
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(main)
