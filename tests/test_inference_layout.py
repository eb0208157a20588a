"""The two params layouts (model.params: stacked blocks run by lax.scan, unstacked per-layer
blocks run by an unrolled loop) give the same results: logits, every tap, edits, the KV cache,
generation, sharded placement, and a round trip between them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valuedist.interp import lens, patching
from valuedist.model import params as P, sampler, sites, transformer as model
from valuedist.model.edits import Add, Patch, Where
from valuedist.parallel import sharding
from valuedist.values import conva
from tests.test_model import _batch, tiny  # noqa: F401  (the three-family fixture)

fwd = jax.jit(model.forward, static_argnames=("cfg", "taps", "tap_last", "logits"))


def _same(a, b, err_msg=""):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=err_msg)


def _close(a, b, err_msg=""):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=err_msg)


def test_round_trip_and_layout_names(tiny):
  cfg, params = tiny
  un = P.unstack_blocks(params)
  assert P.layout_of(params) == "stacked" and P.layout_of(un) == "unstacked"
  assert len(un["blocks"]) == cfg.n_layers
  assert P.unstack_blocks(un) is un and P.stack_blocks(params) is params
  jax.tree.map(_same, P.stack_blocks(un), params)
  host = P.unstack_blocks(jax.tree.map(np.asarray, params))
  assert isinstance(jax.tree.leaves(host["blocks"])[0], np.ndarray)            # host stays host-side
  _same(P.block_leaf(un, "attn", "o", "kernel"), params["blocks"]["attn"]["o"]["kernel"])
  with pytest.raises(ValueError, match="layout must be one of"):
    P.with_layout(params, "scanned")


def test_logits_and_every_tap_are_equal(tiny):
  """A plain forward gives the same logits and taps in both layouts, to f32 rounding: the
  unstacked layout stores each kernel transposed ([O, I], `layers.dense`), and XLA's CPU
  product over it sums in another order at some shapes (~5e-7 on these tiny models; bitwise
  the same at the SmolLM2 shapes measured), and in families with post-norms (Gemma 2/3) XLA
  fuses the post-norm's reduction into the residual add differently in the scan body and in
  the unrolled loop."""
  cfg, params = tiny
  tokens, mask = _batch(cfg, [7, 3])
  un = P.unstack_blocks(params)
  a = fwd(params, tokens, cfg, attention_mask=mask, taps=sites.SITES)
  b = fwd(un, tokens, cfg, attention_mask=mask, taps=sites.SITES)
  _close(a[0], b[0], "logits")
  for name in sites.SITES:
    assert a[2][name].shape == b[2][name].shape, name
    _close(a[2][name], b[2][name], name)
  names = ("resid_post", "attn.z")
  last_a = fwd(params, tokens, cfg, attention_mask=mask, taps=names, tap_last=True)[2]
  last_b = fwd(un, tokens, cfg, attention_mask=mask, taps=names, tap_last=True)[2]
  for name in names:
    assert last_b[name].shape == a[2][name][:, :, -1].shape
    _close(last_a[name], last_b[name], name)


def test_edits_see_their_layer_in_both_layouts(tiny):
  """Layer-selected edits (Where.layers, per-layer values, ConVA reading ctx.layer) and a patch
  from a cached run act on the same layer in both layouts."""
  cfg, params = tiny
  tokens, mask = _batch(cfg, [6, 4])
  un = P.unstack_blocks(params)
  rng = np.random.RandomState(1)
  add = Add(site="resid_mid", value=jnp.asarray(rng.randn(cfg.n_layers, cfg.d_model), jnp.float32), per_layer=True,
            where=Where(layers=jax.nn.one_hot(1, cfg.n_layers)))
  w = jnp.asarray(rng.randn(cfg.n_layers, cfg.d_model) / np.sqrt(cfg.d_model), jnp.float32)
  steer = conva.GatedMinimalActivation(w, jnp.full((cfg.n_layers,), -3.0), conva.layer_mask([0, 1], cfg.n_layers),
                                       jnp.asarray(2.0), jnp.ones((2,)))
  src = fwd(params, tokens, cfg, attention_mask=mask, taps=("attn.z",))[2]["attn.z"]
  patch = Patch(site="attn.z", source=src, where=Where(layers=jax.nn.one_hot(0, cfg.n_layers)))
  base = fwd(params, tokens, cfg, attention_mask=mask)[0]
  for iv in (add, steer, model.Compose((add, patch))):
    a = fwd(params, tokens, cfg, attention_mask=mask, intervene=iv)[0]
    b = fwd(un, tokens, cfg, attention_mask=mask, intervene=iv)[0]
    _close(a, b, type(iv).__name__)       # edits change fusion (~2e-7), as live taps do
    if iv is not patch:
      assert np.abs(np.asarray(a) - np.asarray(base)).max() > 1e-4


def test_generation_and_cache_are_equal(tiny):
  """Greedy tokens are identical and per-step observed logits and taps equal to f32 rounding
  (the decode program fuses differently, ~2e-7); the unstacked layout keeps one cache buffer
  per layer holding the same keys."""
  cfg, params = tiny
  tokens, mask = _batch(cfg, [8, 5, 2])
  un = P.unstack_blocks(params)
  w = jnp.asarray(np.random.RandomState(2).randn(cfg.n_layers, cfg.d_model), jnp.float32) / np.sqrt(cfg.d_model)
  steer = conva.GatedMinimalActivation(w, jnp.full((cfg.n_layers,), -3.0), conva.layer_mask([1], cfg.n_layers),
                                       jnp.asarray(2.0), jnp.ones((3,)))
  obs = lambda logits, taps, aux: {"logits": logits, "resid": taps["resid_post"]}
  for iv in (None, steer):
    a = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, intervene=iv, observe=obs,
                         observe_taps=("resid_post",))
    b = sampler.generate(un, tokens, mask, cfg, max_new_tokens=6, intervene=iv, observe=obs,
                         observe_taps=("resid_post",))
    _same(a.tokens, b.tokens)
    _same(a.lengths, b.lengths)
    jax.tree.map(_close, a.observed, b.observed)
  stacked_cache = model.forward(params, tokens, cfg, attention_mask=mask, cache=model.init_cache(cfg, 3, 12))[1]
  layer_cache = model.forward(un, tokens, cfg, attention_mask=mask, cache=model.init_cache(cfg, 3, 12, per_layer=True))[1]
  assert isinstance(layer_cache.k, tuple) and len(layer_cache.k) == cfg.n_layers
  for l in range(cfg.n_layers):
    _close(stacked_cache.k[l], layer_cache.k[l])
    _close(stacked_cache.v[l], layer_cache.v[l])
  # unstacked params also run on a stacked cache; a per-layer cache refuses stacked params
  mixed = model.forward(un, tokens, cfg, attention_mask=mask, cache=model.init_cache(cfg, 3, 12))[1]
  _close(mixed.k, stacked_cache.k)
  with pytest.raises(ValueError, match="per-layer cache needs unstacked params"):
    model.forward(params, tokens, cfg, attention_mask=mask, cache=model.init_cache(cfg, 3, 12, per_layer=True))


def test_per_layer_cache_is_written_in_place(tiny):
  """A later call into a filled per-layer cache (two new tokens after a prefill) gives the
  stacked layout's logits (to f32 rounding) and cache, and its compiled step, the cache
  donated as in the sampler's loop, copies no cache buffer: each layer writes its new keys
  into its buffer before attending to it (reading a donated buffer first made XLA copy it,
  4 copies per layer)."""
  cfg, params = tiny
  tokens, mask = _batch(cfg, [8, 5, 2])
  un = P.unstack_blocks(params)
  nxt = jnp.asarray(np.random.RandomState(5).randint(3, cfg.vocab_size, (3, 2)), jnp.int32)
  pos = mask.sum(1, keepdims=True) + jnp.arange(2)[None]
  out = []
  for p, per_layer in ((params, False), (un, True)):
    cache = model.forward(p, tokens, cfg, attention_mask=mask, cache=model.init_cache(cfg, 3, 13, per_layer=per_layer))[1]
    out.append(model.forward(p, nxt, cfg, positions=pos, cache=cache)[:2])
  _close(out[0][0], out[1][0])        # decode programs fuse differently (~5e-7), as in generation
  for l in range(cfg.n_layers):
    _close(out[0][1].k[l], out[1][1].k[l])
    _close(out[0][1].v[l], out[1][1].v[l])
  _same(out[0][1].key_pos, out[1][1].key_pos)

  step = lambda p, tok, pos, cache: model.forward(p, tok, cfg, positions=pos, cache=cache)[:2]
  cache = model.forward(un, tokens, cfg, attention_mask=mask, cache=model.init_cache(cfg, 3, 13, per_layer=True))[1]
  hlo = jax.jit(step, donate_argnums=3).lower(un, nxt[:, :1], pos[:, :1], cache).compile().as_text()
  buffers = {f"f32[{','.join(map(str, a.shape))}]" for a in cache.k + cache.v}
  copies = [line for line in hlo.splitlines() if " copy(" in line and line.split("=")[1].split("{")[0].strip() in buffers]
  assert not copies, f"{len(copies)} copies of cache buffers, e.g. {copies[0].strip()[:120]}"


def test_patching_grid_and_lens_agree(tiny):
  cfg, params = tiny
  clean, corrupt = _batch(cfg, [6, 6]), _batch(cfg, [6, 6], seed=3)
  un = P.unstack_blocks(params)
  metric = lambda logits: logits[:, -1, 0] - logits[:, -1, 1]
  out = []
  for p in (params, un):
    out.append(patching.activation_patching(p, cfg, metric, clean, corrupt, "resid_pre"))
    z = patching.run_with_cache(p, clean[0], cfg, ("attn.z",), attention_mask=clean[1])[1]["attn.z"]
    out.append(lens.head_outputs(p, cfg, z))
  _close(out[0], out[2])
  _close(out[1], out[3])


def test_sharded_unstacked_equals_one_device(tiny):
  """Per-layer kernels are split on the model axis like the stacked ones (whole heads, Megatron
  columns/rows), and a 4 x 2 mesh gives the one-device logits."""
  cfg, params = tiny
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = sharding.make_mesh(4, 2)
  un = P.unstack_blocks(jax.tree.map(np.asarray, params))
  placed = sharding.shard_params(un, mesh, cfg)
  stacked_specs = sharding.param_shardings(sharding.shard_params(jax.tree.map(np.asarray, params), mesh, cfg), mesh, cfg)
  pad = lambda spec: tuple(spec) + (None,) * (2 - len(spec))
  for l in range(cfg.n_layers):
    for name in ("q", "k", "v", "o"):
      want = pad(tuple(stacked_specs["blocks"]["attn"][name]["kernel"].spec)[1:])       # [I, O]
      got = pad(placed["blocks"][l]["attn"][name]["kernel_t"].sharding.spec)            # [O, I]
      assert got[::-1] == want, (l, name)
  tokens, mask = _batch(cfg, [7, 5, 3, 6, 2, 7, 4, 1])
  want = fwd(params, tokens, cfg, attention_mask=mask)[0]
  with jax.set_mesh(mesh):
    got = fwd(placed, sharding.shard_batch(tokens, mesh), cfg, attention_mask=sharding.shard_batch(mask, mesh))[0]
  np.testing.assert_allclose(np.asarray(got)[..., :cfg.vocab_size], np.asarray(want), atol=1e-5)


def test_load_and_configs_take_a_layout(tmp_path):
  """Every study config has the switch, and a wrong value is refused in one line before loading."""
  import importlib
  from valuedist import checkpoints
  for name in ("gap", "conva", "causal", "generate", "patching"):
    assert importlib.import_module(f"configs.{name}").get_config().layout in P.LAYOUTS, name
  with pytest.raises(checkpoints.LoadError, match="layout must be one of"):
    checkpoints.load(str(tmp_path), layout="scanned")


def test_large_kernels_are_multiplied_with_the_weight_on_the_left():
  """layers.dense with a transposed kernel [O, I] of at least WEIGHT_LEFT_MIN_BYTES: up to
  WEIGHT_LEFT_ROWS rows the compiled product has the weight as its left operand (the form XLA's
  CPU matmul streams faster; the barriers keep XLA from folding it back), above that a plain
  product; both equal x @ kernel to f32 rounding, and a small kernel takes the plain product."""
  from valuedist.model import layers
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((576, 1536)).astype(np.float32) / 24
  assert kernel.nbytes >= layers.WEIGHT_LEFT_MIN_BYTES
  p = {"kernel_t": jnp.asarray(kernel.T.copy())}
  dense = jax.jit(layers.dense)

  def dots(p, x):
    return [line for line in dense.lower(p, x).compile().as_text().splitlines() if " dot(" in line]

  for rows, left in ((8, True), (layers.WEIGHT_LEFT_ROWS, True), (layers.WEIGHT_LEFT_ROWS + 8, False)):
    x = jnp.asarray(rng.standard_normal((2, rows // 2, 576)).astype(np.float32))
    _close(dense(p, x), np.einsum("bti,io->bto", np.asarray(x), kernel))
    (dot,) = dots(p, x)
    assert dot.split("=")[1].strip().startswith(f"f32[1536,{rows}]" if left else f"f32[{rows},1536]"), (rows, dot)
  small = {"kernel_t": jnp.asarray(kernel[:64, :256].T.copy())}                       # 64 KiB
  (dot,) = dots(small, jnp.zeros((8, 64), jnp.float32))
  assert dot.split("=")[1].strip().startswith("f32[8,256]"), dot
