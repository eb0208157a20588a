"""Runs one command as several JAX processes on this machine: a multi-host slice simulated on
CPU (each process gets its own forced device count; gloo collectives between them).

    python -m launch.local_cluster --processes=2 --devices_per_process=4 -- \\
        python -m launch.gap --config.max_prompts=8 --config.max_new_tokens=4

Every process runs the same command with --coordinator=localhost:PORT (a free port),
--num_processes and --process_id appended; its output is printed with a '[i] ' prefix. When
one process fails the others are stopped; the exit status is the first failure's (124 on
timeout).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

from absl import app, flags

_NUM = flags.DEFINE_integer("processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Forced CPU devices per process.")
_TIMEOUT = flags.DEFINE_float("timeout", 3600, "Seconds before every process is killed.")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(devices: int, base: Optional[dict] = None) -> dict:
  """The environment of one CPU process with `devices` forced host devices."""
  env = dict(os.environ if base is None else base)
  flags_ = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = f"{flags_} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run(command: Sequence[str], num_processes: int, devices_per_process: int, timeout: float,
        echo: bool = True, env: Optional[dict] = None) -> tuple[int, list[str]]:
  """Starts `command` as `num_processes` processes (flags for jax.distributed appended) and
  waits for all. Returns (exit status, [output of each process])."""
  port = free_port()
  procs, outputs, threads = [], [], []
  for i in range(num_processes):
    argv = list(command) + [f"--coordinator=localhost:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=process_env(devices_per_process, env))
    procs.append(p)
    outputs.append([])

    def pump(p=p, i=i):
      for line in p.stdout:
        outputs[i].append(line)
        if echo:
          sys.stdout.write(f"[{i}] {line}")
          sys.stdout.flush()
    threads.append(threading.Thread(target=pump, daemon=True))
    threads[-1].start()
  deadline, status = time.monotonic() + timeout, 0
  while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed or time.monotonic() > deadline:
      status = failed[0] if failed else 124
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  for p in procs:
    p.wait()
  for t in threads:
    t.join(timeout=5)
  status = status or next((p.returncode for p in procs if p.returncode), 0)
  return status, ["".join(o) for o in outputs]


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError("give the command after --, e.g. -- python -m launch.gap --config.max_prompts=8")
  status, _ = run(command, _NUM.value, _DEVICES.value, _TIMEOUT.value)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main)
