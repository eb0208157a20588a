"""Fingerprinted caches of the causal study (STUDY_PROTOCOL rule 12): the SAE (sae.npz and its
training checkpoints) is reused only for the same corpus, model, layer and knobs, and streamed
unit keys change with their inputs and stay the same otherwise. Tiny random model, small inputs."""
import dataclasses
import re
import shutil

import jax
import numpy as np
import pytest

from configs import causal as causal_config
from valuedist.parallel import sharding
from valuedist.studies import engine, runner
from valuedist.studies.causal import inputs as causal_inputs, sae as causal_sae, scoring
from valuedist.values import sae as sae_lib, sae_training
from tests import hf_tiny


def config(model_dir, **sae):
  c = causal_config.get_config()
  c.models, c.batch_size, c.bucket, c.mesh.data = model_dir, 16, 128, 1
  c.sae.layer, c.sae.width, c.sae.k, c.sae.steps, c.sae.batch, c.sae.ckpt_every = 1, 32, 4, 10, 32, 5
  c.sae.corpus_new_tokens, c.sae.max_tokens, c.sae.coefs = 2, 16, (1.0,)
  for k, v in sae.items():
    setattr(c.sae, k, v)
  return c


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
  """(model dir, other model dir, runner, small inputs): one scenario and item per value, a few
  prompts, dilemmas and roles."""
  root = tmp_path_factory.mktemp("models")
  dirs = [str(hf_tiny.save_model_dir(root / f"m{s}", "llama", seed=s, chat_template=hf_tiny.CHAT_TEMPLATE,
                                     max_positions=1024)) for s in (3, 4)]
  c = config(dirs[0])
  c.max_roles = 14
  full = causal_inputs.resolve_inputs(c)
  first = lambda rows: [next(x for x in rows if x["value"] == v) for v in causal_inputs.VALUES]
  inputs = causal_inputs.Inputs(first(full.items), full.roles[:2], [dirs[0]], first(full.scenarios), full.prompts[:4],
                                full.dilemmas[:2])
  return dirs[0], dirs[1], load(dirs[0]), inputs


def load(model_dir):
  return runner.load_runner("model", model_dir, config(model_dir), [], sharding.make_mesh(1))


@pytest.fixture
def train_calls(monkeypatch):
  """Counts calls of sae_training.train (the study's only way to train an SAE)."""
  calls = []
  real = sae_training.train

  def counted(*a, **kw):
    calls.append(kw)
    return real(*a, **kw)
  monkeypatch.setattr(sae_training, "train", counted)
  return calls


def arrays(s):
  return [np.asarray(getattr(s, n)) for n in sae_lib.ARRAYS]


# ----------------------------------------------------------------------------- the SAE

def test_get_sae_retrains_exactly_when_its_inputs_change(rig, tmp_path, train_calls):
  model_dir, other_dir, r, inputs = rig
  store = engine.ResultStore(tmp_path / "records.jsonl")

  def get(inp=inputs, rr=r, **sae):
    n, c = len(train_calls), config(model_dir, **sae)
    s, fp, *_ = causal_sae.get_sae(store, rr, inp, c, tmp_path, c.sae.layer)
    return s, fp, len(train_calls) - n

  base, fp, n = get()
  assert n == 1 and sae_lib.saved_fingerprint(tmp_path / "sae.npz") == fp
  again, fp_again, n = get()
  assert n == 0 and fp_again == fp                                    # unchanged config: reused, not trained
  assert sae_lib.sae_digest(again) == sae_lib.sae_digest(base) and again.kind == "topk" and again.k == 4
  fewer = dataclasses.replace(inputs, dilemmas=inputs.dilemmas[:1])
  changes = {"layer": dict(layer=2), "width": dict(width=48), "k": dict(k=3), "steps": dict(steps=6),
             "corpus": dict(inp=fewer), "own answers": dict(corpus_new_tokens=3), "model": dict(rr=load(other_dir))}
  seen = {fp}
  for name, kw in changes.items():
    s, fp_new, n = get(**kw)
    assert n == 1, f"{name}: a changed {name} must retrain the SAE"
    assert fp_new not in seen, name
    seen.add(fp_new)
    assert sae_lib.saved_fingerprint(tmp_path / "sae.npz") == fp_new
  back, fp_back, n = get()                  # sae.npz and the checkpoints now hold the last change's SAE
  assert n == 1 and fp_back == fp
  for a, b in zip(arrays(base), arrays(back)):                       # trained afresh, not resumed from another run
    np.testing.assert_array_equal(a, b)


def test_an_old_sae_file_without_fingerprint_is_not_reused(rig, tmp_path, train_calls):
  model_dir, _, r, inputs = rig
  c = config(model_dir)
  sae_lib.save_sae(tmp_path / "sae.npz", sae_lib.init_topk(jax.random.PRNGKey(0), r.cfg.d_model, 32, 4))
  assert sae_lib.saved_fingerprint(tmp_path / "sae.npz") is None
  causal_sae.get_sae(engine.ResultStore(tmp_path / "records.jsonl"), r, inputs, c, tmp_path, 1)
  assert len(train_calls) == 1


def test_train_never_resumes_a_checkpoint_of_another_fingerprint(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(200, 8)).astype(np.float32), rng.normal(size=(200, 8)).astype(np.float32)
  kw = dict(width=16, k=2, batch=32, seed=0, progress=False)
  ck = dict(ckpt_dir=tmp_path / "ck", ckpt_every=5)
  fresh = {"x": sae_training.train(x, steps=20, **kw), "y": sae_training.train(y, steps=20, **kw),
           "x10": sae_training.train(x, steps=10, **kw)}
  steps = []
  real_step = sae_training.train_step
  monkeypatch.setattr(sae_training, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))

  def run(acts, n_steps, want, n_expected, **extra):
    steps.clear()
    s = sae_training.train(acts, steps=n_steps, **{**kw, **extra}, **ck)
    assert len(steps) == n_expected
    for a, b in zip(arrays(s), arrays(fresh[want]) if want else arrays(s)):
      np.testing.assert_array_equal(a, b)
    return s

  run(x, 20, "x", 20)
  run(x, 20, "x", 0)                        # same fingerprint, finished: returned without training
  run(y, 20, "y", 20)                       # finished checkpoint of other activations: trained from scratch
  run(x, 20, "x", 20)
  run(x, 10, "x10", 10)                     # the checkpoint ran past `steps`: not returned
  run(x, 20, "x", 10)                       # resumed from step 10 of the same run
  run(x, 20, None, 20, width=24)            # another width: no shape clash, trained from scratch
  assert (tmp_path / "ck" / "fingerprint.txt").read_text().strip() == sae_training.train_fingerprint(
      x, width=24, k=2, batch=32, lr=1e-3, seed=0)
  assert sae_training.train_fingerprint(x, width=16, k=2, batch=32, lr=1e-3, seed=0) != sae_training.train_fingerprint(
      x, width=16, k=3, batch=32, lr=1e-3, seed=0)


# ----------------------------------------------------------------------------- unit keys

def keys(store):
  return [rec["unit"] for rec in store.records()]


def test_role_score_keys_change_with_their_inputs_only(rig, tmp_path):
  model_dir, other_dir, r, inputs = rig
  c = config(model_dir)
  store = engine.ResultStore(tmp_path / "records.jsonl")
  systems = [None] + [ro["role"] for ro in inputs.roles]
  first = scoring.score_prompts(store, r, inputs, c, tag="roles", systems=systems)
  base = sorted(set(keys(store)))
  assert base and all(re.fullmatch(r"roles#[0-9a-f]{12}/\d+", k) for k in base)
  n = len(store.records())
  again = scoring.score_prompts(store, load(model_dir), inputs, c, tag="roles", systems=systems)    # a fresh load
  assert len(store.records()) == n
  np.testing.assert_array_equal(first, again)
  moved = str(tmp_path / "elsewhere")
  shutil.copytree(model_dir, moved)          # the same model at another path: the same keys
  assert runner.model_identity(load(moved)) == runner.model_identity(r)
  items = [dict(it, text=it["text"] + " Always.") if i == 0 else it for i, it in enumerate(inputs.items)]
  changes = {"roles": dict(systems=systems[:-1]), "system prompt": dict(systems=[None, systems[1] + "!"] + systems[2:]),
             "items": dict(inputs=dataclasses.replace(inputs, items=items)), "model": dict(r=load(other_dir)),
             "intervention": dict(depends=["other"]), "batching": dict(c=config(model_dir))}
  changes["batching"]["c"].batch_size = 8
  seen = set(base)
  for name, kw in changes.items():
    args = {**dict(r=r, inputs=inputs, c=c, systems=systems), **kw}
    before = len(store.records())
    scoring.score_prompts(store, args.pop("r"), args.pop("inputs"), args.pop("c"), tag="roles", **args)
    new = set(keys(store)[before:])
    assert new and not new & seen, f"{name}: a changed {name} must give new unit keys"
    seen |= new


def test_corpus_keys_change_with_the_answers_settings(rig, tmp_path):
  model_dir, other_dir, r, inputs = rig
  store = engine.ResultStore(tmp_path / "records.jsonl")
  lists = causal_sae.corpus_tokens(store, r, inputs, config(model_dir))
  base = keys(store)
  assert base and all(re.fullmatch(r"corpus#[0-9a-f]{12}/\d+", k) for k in base)
  assert len(lists) == len(causal_sae.corpus(inputs)) + len(inputs.prompts)
  assert causal_sae.corpus_tokens(store, load(model_dir), inputs, config(model_dir)) == lists
  assert keys(store) == base                                        # reused, nothing generated again
  for name, (rr, c, inp) in {"answer length": (r, config(model_dir, corpus_new_tokens=3), inputs),
                             "prompts": (r, config(model_dir), dataclasses.replace(inputs, prompts=inputs.prompts[1:])),
                             "model": (load(other_dir), config(model_dir), inputs)}.items():
    n = len(store.records())
    causal_sae.corpus_tokens(store, rr, inp, c)
    new = set(keys(store)[n:])
    assert new and not new & set(base), f"{name}: a changed {name} must give new corpus keys"


def test_sae_steering_keys_carry_the_sae_fingerprint(rig, tmp_path):
  model_dir, _, r, inputs = rig
  store = engine.ResultStore(tmp_path / "records.jsonl")
  g = np.zeros((len(causal_inputs.VALUES),) * 2, int)
  items = np.zeros((1, len(inputs.items)))

  def steering_keys(c, out):
    n = len(store.records())
    s = causal_sae.sae_part(store, r, inputs, c, out, c.sae.layer, items, g)
    return s, list(dict.fromkeys(rec["cond"] for rec in store.records()[n:] if rec.get("cond", "").startswith("sae-")))

  s, base = steering_keys(config(model_dir), tmp_path / "a")      # the feature's condition of each value
  assert len(base) == len(s["steering"]) == len(causal_inputs.VALUES)
  for e, k in zip(s["steering"], base):
    assert re.fullmatch(rf"sae-add/{e['target']}/{e['latent']}/1#[0-9a-f]{{12}}", k)
  again, none = steering_keys(config(model_dir), tmp_path / "a")
  assert none == [] and again["fingerprint"] == s["fingerprint"]    # unchanged: every unit reused
  other, moved = steering_keys(config(model_dir, layer=2), tmp_path / "b")
  assert other["fingerprint"] != s["fingerprint"] and moved and not set(moved) & set(base)
  _, clamp = steering_keys(config(model_dir, mode="clamp"), tmp_path / "a")
  assert clamp and not set(clamp) & set(base)
