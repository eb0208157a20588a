"""Two processes x four CPU devices (a simulated multi-host slice, launch.local_cluster)
against one process: the model, generation and the studies give the same results."""
import json
import re
import sys

import numpy as np
import pytest

from launch import local_cluster
from tests import hf_tiny, multihost_worker

TIMEOUT = 1500          # per 2-process run; a slow CI machine shares its 2 cores with another test worker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return str(hf_tiny.save_model_dir(tmp_path_factory.mktemp("models") / "llama", "llama", seed=4,
                                    chat_template=hf_tiny.CHAT_TEMPLATE, max_positions=1024))


def cluster(args, n=2, devices=4):
  status, outputs = local_cluster.run([sys.executable, "-m"] + list(args), n, devices, TIMEOUT, echo=False)
  assert status == 0, "\n".join(f"--- process {i}\n{o[-4000:]}" for i, o in enumerate(outputs))
  return outputs


@pytest.mark.parametrize("model_axis", [1, 2])
def test_two_processes_equal_one_bitwise(model_dir, tmp_path, model_axis):
  """Forward logits and greedy/sampled tokens of 2 processes x 4 devices equal those of one
  process with 8 devices and with 1, bitwise (data x model = 8/model x model); the params'
  digest (what model_identity hashes, streamed chunk by chunk on several processes) too."""
  cluster(["tests.multihost_worker", model_dir, str(tmp_path / "two.npz"), f"--model={model_axis}"])
  two = dict(np.load(tmp_path / "two.npz"))
  assert int(two.pop("devices")) == 8
  eight = multihost_worker.run(model_dir, model_axis)
  one = multihost_worker.run(model_dir, 1, data_axis=1)
  for k in ("logits", "greedy", "sampled"):
    np.testing.assert_array_equal(two[k], eight[k], err_msg=k)
  np.testing.assert_array_equal(two["greedy"], one["greedy"])
  np.testing.assert_allclose(two["logits"], one["logits"], atol=1e-5)
  assert str(two["fingerprint"]) == str(eight["fingerprint"]) == str(one["fingerprint"])   # any mesh, any process count


def _stores(folder):
  """Every record store of a study folder: records.jsonl and judge files, each with the
  per-process files beside it read as one (engine.ResultStore)."""
  from valuedist.studies import engine
  names = {re.sub(r"\.\d+-of-\d+(?=\.jsonl$)", "", p.name): p.parent for p in folder.rglob("*.jsonl")}
  return {name: engine.ResultStore(parent / name) for name, parent in names.items()}


def _records(folder):
  """Every record of a study folder (all its stores), each store in its own order."""
  return {name: [json.dumps(r, sort_keys=True) for r in s.records()] for name, s in sorted(_stores(folder).items())}


def _flags(c) -> list[str]:
  """--config.KEY=VALUE flags of a study config's leaves."""
  out = []
  for k, v in c.items():
    if hasattr(v, "items"):
      out += _flags_of(f"{k}.", v)
    else:
      out.append(_flag(k, v))
  return out


def _flags_of(prefix, d):
  return [_flag(prefix + k, v) for k, v in d.items()]


def _flag(k, v):
  return f"--config.{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"


def _summaries(folder):
  out = {}
  for p in sorted(folder.rglob("summary.json")):
    s = json.loads(p.read_text())
    s.pop("provenance", None)
    for k in ("out_dir", "cache_dir"):
      s.get("config", {}).pop(k, None)
    out[str(p.relative_to(folder))] = s
  return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return str(hf_tiny.save_model_dir(tmp_path_factory.mktemp("models") / "gemma3", "gemma3", seed=5, max_positions=1024))


def _study(name, model_dir, base_dir, out):
  """(module, launcher, config) of a tiny run of study `name` writing to `out`, on every device."""
  from valuedist.studies import causal, conva, gap
  from tests import test_causal_study, test_conva_study, test_gap_study
  if name == "gap":
    c = test_gap_study.config((model_dir, base_dir), out, max_prompts=8, batch_size=8)
  elif name == "conva":
    c = test_conva_study.config((model_dir, base_dir), out, batch_size=8, target_values="power", methods="none,conva,caa",
                                robustness=False, layers="0-1")
  else:
    c = test_causal_study.config(model_dir, out, batch_size=8)
  c.mesh.data = 0
  c.bucket = max(c.bucket, 64)      # coarser prompt-length buckets: fewer shapes to compile (~20% of the time)
  return {"gap": gap, "conva": conva, "causal": causal}[name], f"launch.{name}", c



def test_unstacked_layout_two_processes_equal_one(model_dir, tmp_path):
  """The unstacked (inference) layout on 2 processes x 4 devices, model axis 2 (per-layer
  kernels split across devices of each host), equals one process of 8 devices bitwise, and
  its greedy tokens equal the stacked layout's."""
  cluster(["tests.multihost_worker", model_dir, str(tmp_path / "two.npz"), "--model=2", "--layout=unstacked"])
  two = dict(np.load(tmp_path / "two.npz"))
  eight = multihost_worker.run(model_dir, 2, layout="unstacked")
  for k in ("logits", "greedy", "sampled"):
    np.testing.assert_array_equal(two[k], eight[k], err_msg=k)
  np.testing.assert_array_equal(two["greedy"], multihost_worker.run(model_dir, 2)["greedy"])

@pytest.mark.parametrize("name", ["gap", "conva", "causal"])
def test_study_two_processes_equal_one(model_dir, base_dir, tmp_path, name):
  """A tiny study on 2 processes x 4 devices writes the records and summary one process with
  8 devices writes, in the same order: each process writes the records of its own rows (read
  from its own shards) to records.{i}-of-2.jsonl, and the store merges them. Then some units
  are deleted from both files, one of them left half-written by process 1 (its records without
  the end line) and its tail cut mid-line, as an interruption leaves them: the 2-process rerun
  agrees on what is done (process 0's view), redoes exactly those units and reproduces the
  records."""
  study, launcher, c = _study(name, model_dir, base_dir, tmp_path / "one")
  study.run(c)
  _, _, c2 = _study(name, model_dir, base_dir, tmp_path / "two")
  cluster([launcher, f"--config=configs/{name}.py"] + _flags(c2))
  assert not list((tmp_path / "one").rglob("*-of-*"))
  parts = sorted((tmp_path / "two").rglob("records.*-of-2.jsonl"))
  assert [p.name for p in parts] == ["records.0-of-2.jsonl", "records.1-of-2.jsonl"]
  assert _records(tmp_path / "two") == _records(tmp_path / "one")
  assert _summaries(tmp_path / "two") == _summaries(tmp_path / "one")
  lines = [p.read_text().splitlines(keepends=True) for p in parts]
  ends = [json.loads(l)["_unit_done"] for l in lines[0] if "_unit_done" in l]
  drop = set(ends[::3])
  for p, ls in zip(parts, lines):
    p.write_text("".join(l for l in ls if json.loads(l).get("unit", json.loads(l).get("_unit_done")) not in drop))
  half = [l for l in lines[1] if json.loads(l).get("unit") == ends[0]]
  with open(parts[1], "a") as f:
    f.write("".join(half) + lines[1][-1][:10])
  cluster([launcher, f"--config=configs/{name}.py"] + _flags(c2))
  sort = lambda stores: {k: sorted(v) for k, v in stores.items()}      # redone units come last
  assert sort(_records(tmp_path / "two")) == sort(_records(tmp_path / "one"))


def test_embedded_conversion_once_on_two_processes(tmp_path):
  """First use of an embedded model on 2 processes: process 0 converts into the shared cache,
  both restore the same params (the cache entry is complete and marked done once); process 0
  says what it does, with a progress bar over the tensors."""
  out = tmp_path / "fp.txt"
  code = ("import sys\nfrom valuedist.parallel import hosts, sharding\n"
          "hosts.initialize(sys.argv[2].split('=')[1], int(sys.argv[3].split('=')[1]), int(sys.argv[4].split('=')[1]))\n"
          "from valuedist import checkpoints\nimport numpy as np, hashlib\n"
          f"m = checkpoints.load('smollm2-135m-instruct', cache_dir={str(tmp_path / 'cache')!r}, mesh=sharding.make_mesh())\n"
          "h = hashlib.sha256(b''.join(hosts.to_host(x).tobytes() for x in __import__('jax').tree.leaves(m.params)))\n"
          f"open({str(out)!r} + str(__import__('jax').process_index()), 'w').write(h.hexdigest())\n")
  status, outputs = local_cluster.run([sys.executable, "-c", code, "x"], 2, 2, TIMEOUT, echo=False)
  assert status == 0, "\n".join(o[-3000:] for o in outputs)
  assert (tmp_path / "fp.txt0").read_text() == (tmp_path / "fp.txt1").read_text()
  entries = list((tmp_path / "cache" / "converted").iterdir())
  assert len(entries) == 1 and (entries[0] / "done.json").exists() and (entries[0] / "params").exists()
  assert sum("converting" in o for o in outputs) == 1            # process 0 converted, and said so
  said = next(o for o in outputs if "converting" in o)
  assert "dequantizing" in said and "tensor/s" in said and "tokenizer built" in said      # stages and a progress bar


def test_patching_example_two_processes_equal_one(model_dir, tmp_path):
  """The worked patching example (launch.patching) with its pairs split across 2 processes x 4
  devices writes the grids and summary one process with 8 devices writes, bitwise, and one
  device's within float tolerance; a 2-process rerun in the 8-device run's folder resumes it
  (the files are keyed by config and model, not by the mesh) without recomputing a grid."""
  from valuedist.studies import patching as study
  from tests import test_patching_study
  c = test_patching_study._config(model_dir, tmp_path / "one")
  one = study.run(c)
  c1 = test_patching_study._config(model_dir, tmp_path / "single")
  c1.mesh.data = 1
  single = study.run(c1)
  cluster(["launch.patching", "--config=configs/patching.py"] + _flags(test_patching_study._config(model_dir, tmp_path / "two")))
  for name in ("grids/resid_pre.npz", "grids/attn.z.npz", "attribution_grids.npz"):
    with np.load(tmp_path / "one" / name) as a, np.load(tmp_path / "two" / name) as b, np.load(tmp_path / "single" / name) as s:
      assert sorted(a.files) == sorted(b.files), name
      for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
        if k != "key":
          np.testing.assert_allclose(a[k], s[k], atol=1e-5, err_msg=f"{name}:{k} on one device")
  summary = lambda d: json.loads((tmp_path / d / "summary.json").read_text())
  assert summary("two") == summary("one")
  assert [x["observed"] for x in single["comparisons"]] == pytest.approx([x["observed"] for x in one["comparisons"]], abs=1e-4)
  stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.npz")}
  cluster(["launch.patching", "--config=configs/patching.py"] + _flags(c))
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.npz")} == stamps
  assert summary("one") == json.loads(json.dumps(one))             # the resumed run's summary is the same
