"""Loading Hugging Face directories and GGUF tensors, orbax round trips, and load errors."""
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from valuedist import checkpoints as loading
from valuedist.model import transformer as model
from tests import hf_tiny


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "llama"
  return hf_tiny.save_model_dir(path, "llama", chat_template=hf_tiny.CHAT_TEMPLATE)


def _logits_match(path, m):
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
  tokens = np.random.RandomState(0).randint(0, 256, (2, 9))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens)).logits.numpy()
  got, _, _ = model.forward(m.params, jnp.asarray(tokens), m.cfg)
  assert np.abs(np.asarray(got) - ref).max() <= 1e-4


def test_hf_dir_loads_and_matches(hf_dir, tmp_path):
  m = loading.load(str(hf_dir), cache_dir=tmp_path)
  _logits_match(hf_dir, m)
  assert m.eos_ids == (258,) and m.pad_id == 256 and m.tokenizer.chat_template


def test_sharded_dir_with_index(tmp_path):
  import transformers
  path = hf_tiny.save_model_dir(tmp_path / "m", "qwen2")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(path))
  hf.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
  assert (path / "model.safetensors.index.json").exists()
  m = loading.load(str(path), cache_dir=tmp_path)
  _logits_match(path, m)


def test_bf16_checkpoint(tmp_path):
  import transformers
  path = hf_tiny.save_model_dir(tmp_path / "m", "llama")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).to(torch.bfloat16)
  hf.save_pretrained(path, safe_serialization=True)
  cfg, params = loading.load_hf_dir(path)
  assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
  want = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"].float().numpy().T
  np.testing.assert_array_equal(np.asarray(params["blocks"]["attn"]["q"]["kernel"][0], np.float32), want)


def test_orbax_round_trip_with_shardings(hf_dir, tmp_path):
  from valuedist.parallel import sharding
  cfg, params = loading.load_hf_dir(hf_dir)
  loading.save_params(tmp_path / "ckpt", params)
  mesh = sharding.make_mesh(4, 2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  restored = loading.restore_params(tmp_path / "ckpt", abstract, sharding.param_shardings(abstract, mesh))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = restored["blocks"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")


def _err(fn):
  with pytest.raises(ValueError) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_missing_and_truncated_files(hf_dir, tmp_path):
  assert "unknown model spec" in _err(lambda: loading.load("no-such-model"))
  assert "no such file" in _err(lambda: loading.load_gguf(tmp_path / "x.gguf"))
  broken = tmp_path / "broken"
  broken.mkdir()
  for f in hf_dir.iterdir():
    (broken / f.name).write_bytes(f.read_bytes())
  data = (broken / "model.safetensors").read_bytes()
  (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
  assert "truncated" in _err(lambda: loading.load_hf_dir(broken))


def test_shard_missing_from_index(tmp_path):
  import transformers
  path = hf_tiny.save_model_dir(tmp_path / "m", "llama")
  transformers.AutoModelForCausalLM.from_pretrained(str(path)).save_pretrained(path, max_shard_size="100KB")
  index = json.loads((path / "model.safetensors.index.json").read_text())
  victim = sorted(set(index["weight_map"].values()))[1]
  (path / victim).unlink()
  assert f"shard {victim}" in _err(lambda: loading.load_hf_dir(path))


def test_wrong_shape_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  path = hf_tiny.save_model_dir(tmp_path / "m", "llama")
  tensors = load_file(path / "model.safetensors")
  tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  msg = _err(lambda: loading.load_hf_dir(path))
  assert "model.layers.1.mlp.up_proj.weight" in msg and "shape" in msg


def _write_gguf(path, tensors, arch="llama"):
  w = gguf.GGUFWriter(str(path), arch)
  for name, (arr, qtype) in tensors.items():
    if qtype == gguf.GGMLQuantizationType.F32:
      w.add_tensor(name, arr)
    else:
      q = gguf.quants.quantize(arr, qtype)
      w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_dequantizes_q8_0(tmp_path):
  x = np.random.RandomState(0).randn(8, 64).astype(np.float32)
  path = tmp_path / "t.gguf"
  _write_gguf(path, {"a": (x, gguf.GGMLQuantizationType.Q8_0), "b": (x[0], gguf.GGMLQuantizationType.F32)})
  got = {n: (q, a) for n, q, a in loading.read_gguf_tensors(path)}
  assert got["a"][0] == "Q8_0" and got["a"][1].shape == (8, 64)
  np.testing.assert_allclose(got["a"][1], x, atol=np.abs(x).max() / 100)
  np.testing.assert_array_equal(got["b"][1], x[0])


def test_gguf_truncated_and_unknown_quantization(tmp_path):
  x = np.random.RandomState(0).randn(8, 64).astype(np.float32)
  path = tmp_path / "t.gguf"
  _write_gguf(path, {"a": (x, gguf.GGMLQuantizationType.Q8_0)})
  data = path.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:-100])
  assert "truncated" in _err(lambda: list(loading.read_gguf_tensors(cut)))
  # an unknown quantization type id in the tensor info: name (u64 length + bytes), n_dims (u32),
  # dims (u64 each), then the type (u32; Q8_0 = 8) -> 250
  raw = bytearray(data)
  info = raw.find(np.uint64(1).tobytes() + b"a" + np.uint32(2).tobytes())
  type_at = info + 8 + 1 + 4 + 2 * 8
  assert raw[type_at:type_at + 4] == np.uint32(8).tobytes()
  raw[type_at:type_at + 4] = np.uint32(250).tobytes()
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(bytes(raw))
  assert "quantization" in _err(lambda: list(loading.read_gguf_tensors(bad)))


def _hub_cache(root, repo: str, model_dir) -> str:
  """Lays out `model_dir`'s files as the HF hub cache does (models--org--name, refs/main,
  snapshots/<commit>); returns the commit."""
  import shutil
  commit = "0123456789abcdef0123456789abcdef01234567"
  entry = root / ("models--" + repo.replace("/", "--"))
  shutil.copytree(model_dir, entry / "snapshots" / commit)
  (entry / "refs").mkdir(parents=True)
  (entry / "refs" / "main").write_text(commit)
  return commit


def test_hub_id_loads_from_the_local_hf_cache(tmp_path, monkeypatch):
  """'org/name' resolves to the cached snapshot (offline) and loads the same model as its
  directory; an id neither cached nor reachable is a one-line error naming the cache."""
  from tests import hf_tiny
  d = hf_tiny.save_model_dir(tmp_path / "dir", "llama", seed=7)
  _hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", d)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  a, b = loading.load("tiny-org/tiny-llama"), loading.load(str(d))
  assert a.cfg == b.cfg and "snapshots" in a.source
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  msg = _err(lambda: loading.load("tiny-org/missing"))
  assert "not in the local Hugging Face cache" in msg and str(tmp_path / "hub") in msg and "\n" not in msg


def test_sharded_load_reads_only_each_devices_shard(hf_dir):
  """Loading a directory onto a data 4 x model 2 mesh reads, for every leaf, exactly the
  elements of its distinct shards, once (safetensors slices; the stacked layers read per
  layer), never a whole split tensor, and nothing for the rows that pad the vocabulary (259
  to 260); the params, the padding cut back, equal those of a whole read."""
  from valuedist.checkpoints.hf import SafetensorsSlice
  from valuedist.parallel import sharding
  mesh = sharding.make_mesh(4, 2)
  SafetensorsSlice.reads.clear()
  m = loading.load(str(hf_dir), mesh=mesh)
  assert m.cfg.vocab_size == 259 and m.params["embed"]["embedding"].shape[0] == 260
  real = jax.tree.map(lambda x: x.shape, sharding.unpad_vocab(m.params, m.cfg.vocab_size))
  inside = lambda index, shape: int(np.prod([len(range(*i.indices(n))) for i, n in zip(index, shape)]))
  shards = sum(sum({str(s.index): inside(s.index, shape) for s in x.addressable_shards}.values())
               for x, shape in zip(jax.tree.leaves(m.params), jax.tree.leaves(real, is_leaf=lambda t: isinstance(t, tuple))))
  assert sum(SafetensorsSlice.reads) == shards          # each distinct shard's real elements, once for its replicas
  q = m.params["blocks"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
  whole = loading.load(str(hf_dir))
  for a, b in zip(jax.tree.leaves(sharding.unpad_vocab(m.params, m.cfg.vocab_size)), jax.tree.leaves(whole.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lazy = loading.load_hf_dir(hf_dir)[1]["blocks"]["attn"]["k"]["kernel"]
  np.testing.assert_array_equal(lazy[-1], np.asarray(lazy)[-1])
  np.testing.assert_array_equal(lazy[1:, 3, ::2], np.asarray(lazy)[1:, 3, ::2])


def test_dtype_sets_params_and_compute_dtype(hf_dir):
  """dtype=bfloat16 gives bf16 params and a bf16 compute dtype (activations, KV cache);
  the default keeps f32 for both."""
  from valuedist.model import transformer as tr
  m16, m32 = loading.load(str(hf_dir), dtype=jnp.bfloat16), loading.load(str(hf_dir))
  assert m16.cfg.compute_dtype == "bfloat16" and m32.cfg.compute_dtype == "float32"
  assert {x.dtype for x in jax.tree.leaves(m16.params)} == {jnp.dtype(jnp.bfloat16)}
  assert tr.init_cache(m16.cfg, 2, 8).k.dtype == jnp.bfloat16
