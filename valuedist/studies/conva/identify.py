"""Identification: last-token activations of every layer for the minimal pairs (context-
controlled and not), one L-BFGS probe per value and layer (split by scenario), probes saved
with orbax and reloaded while their inputs are unchanged, CAA vectors, and the accuracy
tables and plot (probe_accuracy.{json,csv,png})."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.data import schwartz
from valuedist.studies import engine, report
from valuedist.studies.conva.inputs import Inputs
from valuedist.studies.runner import Runner, model_identity
from valuedist.values import conva, probes

EXTRA = ("caa", "transfer", "pairwise", "pairwise_controlled", "cosine")


def pair_rows(inputs: Inputs, value: str, controlled: bool, forms=None, roles=None):
  """The value's pairs from scenarios whose role (inputs.roles) is in `roles` (None: all):
  texts [2P], labels [2P] (1 = positive side), scenario id per row [2P]. The non-controlled
  contrast pairs each value text with a neutral sentence of the probes' share."""
  scenarios = [s for s in inputs.scenarios if roles is None or inputs.roles.get(s["id"]) in roles]
  pairs = schwartz.value_pairs(value, controlled=controlled, scenarios=scenarios, neutral=inputs.neutral,
                               **({"forms": forms} if forms else {}))
  texts, y, sid = [], [], []
  for p in pairs:
    texts += [p.positive, p.negative]
    y += [1, 0]
    sid += [p.id.split("/")[0]] * 2
  return texts, np.asarray(y, np.int32), np.asarray(sid)


def data_hash(texts: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def _reload(pdir: Path, digest: str, values: Sequence[str]):
  """The saved probes and extras when they were fitted on the same inputs, else None."""
  try:
    found = {k: conva.load_value_probes(pdir / k) for k in ("controlled", "uncontrolled")}
    if all(p.data_hash == digest and p.values == tuple(values) for p in found.values()):
      extra = dict(np.load(pdir / "extra.npz"))
      return {**found, **extra, "caa": jnp.asarray(extra["caa"])}
  except (ValueError, FileNotFoundError, OSError):
    pass
  return None


def activations(r: Runner, texts: Sequence[str], c) -> np.ndarray:
  """[L, N, D] residual stream where the probes are calibrated (config.probe.position):
  'generation', the answer position of each text sent as a chat prompt (where ConVA reads
  and edits a dilemma), or 'text', the plain text's last token."""
  if c.probe.position == "generation":
    return r.generation_activations(texts, c.batch_size)
  return r.last_token_activations(texts, c.batch_size)


def _fit_value(r: Runner, rows: dict, roles: dict, c) -> dict:
  """Both probes of one value ({controlled: (texts, y, scenario ids)}), fitted on the train
  scenarios, scored on validation and test, and what they are compared by: {'fits':
  {controlled: (probe, train, val, test acc)}, EXTRA arrays [L, ...] on the test pairs}."""
  acts, fits = {}, {}
  for ctl in (True, False):
    texts, y, sid = rows[ctl]
    acts[ctl] = activations(r, texts, c)
    split = {k: np.flatnonzero([roles[s] == k for s in sid]) for k in ("train", "val", "test")}
    fits[ctl] = conva.fit_value_probes(acts[ctl], y, split["train"], split["val"], split["test"], l2=c.probe.l2,
                                       max_iter=c.probe.max_iter)
    if ctl:
      caa = conva.mean_difference(jnp.asarray(acts[ctl][:, split["train"]]), y[split["train"]])
      ctl_test, ctl_y = split["test"], y
  unc, ctl_probe = fits[False][0], fits[True][0]
  pos, neg = acts[True][:, ctl_test[0::2]], acts[True][:, ctl_test[1::2]]     # rows are (positive, negative) pairs
  assert (ctl_y[ctl_test[0::2]] == 1).all() and (ctl_y[ctl_test[1::2]] == 0).all()
  return {"fits": fits, "caa": caa,
          "transfer": jax.vmap(probes.accuracy, in_axes=(0, 0, None))(
              unc, jnp.asarray(acts[True][:, ctl_test]), ctl_y[ctl_test]),
          "pairwise": conva.pairwise_accuracy(unc.w, pos, neg),
          "pairwise_controlled": conva.pairwise_accuracy(ctl_probe.w, pos, neg),
          "cosine": jnp.sum(unc.direction() * ctl_probe.direction(), -1)}


def identify(r: Runner, inputs: Inputs, c, out: Path) -> dict:
  """Fits (or reloads, when nothing they depend on changed) the controlled and non-controlled
  probes and the CAA vectors, on the probe scenarios only (train / validation / test; the
  detector scenarios never reach them). Returns {'controlled', 'uncontrolled': ValueProbes,
  'caa': [V, L, D], and [V, L] arrays on the controlled test pairs: 'transfer' (accuracy of
  the non-controlled probes), 'pairwise' and 'pairwise_controlled' (share of pairs each probe
  orders correctly), 'cosine' (between the two probes' directions)}."""
  probe_roles = ("train", "val", "test")
  rows = {v: {ctl: pair_rows(inputs, v, ctl, roles=probe_roles) for ctl in (True, False)} for v in inputs.values}
  digest = data_hash([t for ctl in (True, False) for v in inputs.values for t in rows[v][ctl][0]] +
                     [f"{sid}={role}" for sid, role in sorted(inputs.roles.items())] +
                     [f"{k}={c.probe[k]}" for k in sorted(c.probe)] + [model_identity(r)])
  pdir = out / "probes"
  found = _reload(pdir, digest, inputs.values)
  if found is not None:
    return found
  per_value = [_fit_value(r, rows[v], inputs.roles, c)
               for v in engine.progress(inputs.values, "identify (probes per value)")]
  result = {}
  for ctl, name in ((True, "controlled"), (False, "uncontrolled")):
    f = [pv["fits"][ctl] for pv in per_value]
    vp = conva.ValueProbes(jnp.stack([p.w for p, *_ in f]), jnp.stack([p.b for p, *_ in f]),
                           *(jnp.stack([x[k] for x in f]) for k in (1, 2, 3)),      # train, val, test accuracy
                           values=tuple(inputs.values), data_hash=digest)
    conva.save_value_probes(pdir / name, vp)
    result[name] = vp
  extra = {k: np.asarray(jnp.stack([pv[k] for pv in per_value])) for k in EXTRA}
  buf = io.BytesIO()
  np.savez(buf, **extra)
  engine.atomic_write(pdir / "extra.npz", buf.getvalue())
  return {**result, **extra, "caa": jnp.asarray(extra["caa"])}


PER_LAYER = {   # probe_accuracy.csv column -> (ident key, attribute): train and validation only
    "controlled_train": ("controlled", "train_acc"), "controlled_val": ("controlled", "val_acc"),
    "uncontrolled_train": ("uncontrolled", "train_acc"), "uncontrolled_val": ("uncontrolled", "val_acc"),
    "cosine_controlled_uncontrolled": ("cosine", None),
}
AT_CHOSEN = {   # test figures, read once and only at the chosen layers (mean over them)
    "test_acc_at_chosen": ("controlled", "test_acc"), "uncontrolled_test_at_chosen": ("uncontrolled", "test_acc"),
    "transfer_at_chosen": ("transfer", None), "pairwise_uncontrolled_at_chosen": ("pairwise", None),
    "pairwise_controlled_at_chosen": ("pairwise_controlled", None),
}


def _array(ident: dict, key: str, attr) -> np.ndarray:
  return np.asarray(ident[key] if attr is None else getattr(ident[key], attr))          # [V, L]


def probe_table(ident: dict, c) -> dict:
  """Per value: the layer rule's outcome on validation accuracy ('chosen_layers', 'rule_met'),
  the validation accuracy per layer, and the test figures at the chosen layers only."""
  vp = ident["controlled"]
  table = {}
  for i, v in enumerate(vp.values):
    layers, met = conva.choose_layers(vp.val_acc[i], c.layer_threshold, c.layer_exclude_last)
    at = list(layers)
    table[v] = {"chosen_layers": at, "rule_met": met,
                "rule": f"validation accuracy >= {c.layer_threshold} outside the last {c.layer_exclude_last} layers",
                "val_acc": [round(float(x), 4) for x in np.asarray(vp.val_acc[i])],
                "val_acc_at_chosen": round(float(np.mean(np.asarray(vp.val_acc[i])[at])), 4),
                **{name: round(float(np.mean(_array(ident, k, a)[i, at])), 4) for name, (k, a) in AT_CHOSEN.items()}}
  return table


def write_probe_accuracy(out: Path, ident: dict, c) -> dict:
  """probe_accuracy.json (`probe_table`), probe_accuracy.csv (train and validation accuracy
  per value and layer, directions' cosine) and probe_accuracy.png (validation accuracy per
  layer, chosen layers marked)."""
  values = ident["controlled"].values
  cols = {name: _array(ident, k, a) for name, (k, a) in PER_LAYER.items()}
  n_layers = cols["controlled_val"].shape[1]
  report.write_csv(out / "probe_accuracy.csv", ["value", "layer"] + list(PER_LAYER),
                   [[v, l] + [round(float(cols[n][i, l]), 4) for n in PER_LAYER]
                    for i, v in enumerate(values) for l in range(n_layers)])
  table = probe_table(ident, c)
  engine.atomic_write(out / "probe_accuracy.json", json.dumps(table, indent=2))
  panels = (("controlled_val", "context-controlled pairs: validation accuracy"),
            ("uncontrolled_val", "non-controlled (value text vs neutral): validation accuracy"))
  fig, axes = report.figure(1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True)
  for ax, (key, title) in zip(axes, panels):
    for i, v in enumerate(values):
      line, = ax.plot(cols[key][i], label=v)
      if key == "controlled_val":
        at = table[v]["chosen_layers"]
        ax.scatter(at, cols[key][i][at], color=line.get_color(), s=12)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.axhline(c.layer_threshold, color="grey", lw=0.5, ls="--")
  axes[0].set_ylabel("share (dots: layers the rule chose)")
  axes[-1].legend(fontsize=7, loc="lower right")
  report.save_png(fig, out / "probe_accuracy.png")
  return table
