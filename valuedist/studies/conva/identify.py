"""Identification: last-token activations of every layer for the minimal pairs (context-
controlled and not), one L-BFGS probe per value and layer (split by scenario), probes saved
with orbax and reloaded while their inputs are unchanged, CAA vectors, and the accuracy
tables and plot (probe_accuracy.{json,csv,png})."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.data import schwartz
from valuedist.studies import engine, report
from valuedist.studies.conva.inputs import Inputs
from valuedist.studies.runner import Runner
from valuedist.values import conva, probes

EXTRA = ("caa", "transfer", "pairwise", "pairwise_controlled", "cosine")


def pair_rows(inputs: Inputs, value: str, controlled: bool, forms=None):
  """texts [2P], labels [2P] (1 = positive side), scenario index per row [2P], scenario count."""
  pairs = schwartz.value_pairs(value, controlled=controlled, scenarios=inputs.scenarios, neutral=inputs.neutral,
                               **({"forms": forms} if forms else {}))
  sids = sorted({p.id.split("/")[0] for p in pairs})
  texts, y, sid = [], [], []
  for p in pairs:
    s = sids.index(p.id.split("/")[0])
    texts += [p.positive, p.negative]
    y += [1, 0]
    sid += [s, s]
  return texts, np.asarray(y, np.int32), np.asarray(sid), len(sids)


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


def _fit_value(r: Runner, rows: dict, c) -> dict:
  """Both probes of one value ({controlled: (texts, y, sid, n_scenarios)}) and what they are
  compared by: {'fits': {controlled: (probe, train acc, test acc)}, EXTRA arrays [L, ...]}."""
  acts, fits = {}, {}
  for ctl in (True, False):
    texts, y, sid, n_sc = rows[ctl]
    acts[ctl] = r.last_token_activations(texts, c.batch_size)
    tr_sc, _ = probes.split_train_test(n_sc, c.probe.test_frac, c.probe.seed)
    train = np.flatnonzero(np.isin(sid, tr_sc))
    test = np.flatnonzero(~np.isin(sid, tr_sc))
    fits[ctl] = conva.fit_value_probes(acts[ctl], y, train, test, l2=c.probe.l2, max_iter=c.probe.max_iter)
    if ctl:
      caa = conva.mean_difference(jnp.asarray(acts[ctl][:, train]), y[train])
      ctl_test, ctl_y = test, y
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
  """Fits (or reloads, when the pair texts are unchanged) the controlled and non-controlled
  probes and the CAA vectors. Returns {'controlled', 'uncontrolled': ValueProbes, 'caa': [V, L, D],
  and [V, L] arrays on the controlled test pairs: 'transfer' (accuracy of the non-controlled
  probes), 'pairwise' and 'pairwise_controlled' (share of pairs each probe orders correctly),
  'cosine' (between the two probes' directions)}."""
  rows = {v: {ctl: pair_rows(inputs, v, ctl) for ctl in (True, False)} for v in inputs.values}
  digest = data_hash([t for ctl in (True, False) for v in inputs.values for t in rows[v][ctl][0]] +
                     [f"l2={c.probe.l2}", f"seed={c.probe.seed}", f"test={c.probe.test_frac}", r.model.name])
  pdir = out / "probes"
  found = _reload(pdir, digest, inputs.values)
  if found is not None:
    return found
  per_value = [_fit_value(r, rows[v], c) for v in engine.progress(inputs.values, "identify (probes per value)")]
  result = {}
  for ctl, name in ((True, "controlled"), (False, "uncontrolled")):
    f = [pv["fits"][ctl] for pv in per_value]
    vp = conva.ValueProbes(jnp.stack([p.w for p, _, _ in f]), jnp.stack([p.b for p, _, _ in f]),
                           jnp.stack([a for _, a, _ in f]), jnp.stack([a for _, _, a in f]),
                           values=tuple(inputs.values), data_hash=digest)
    conva.save_value_probes(pdir / name, vp)
    result[name] = vp
  extra = {k: np.asarray(jnp.stack([pv[k] for pv in per_value])) for k in EXTRA}
  np.savez(pdir / "extra.npz", **extra)
  return {**result, **extra, "caa": jnp.asarray(extra["caa"])}


PROBE_COLUMNS = {   # probe_accuracy.csv column -> (ident key, attribute or None)
    "controlled_train": ("controlled", "train_acc"), "controlled_test": ("controlled", "test_acc"),
    "uncontrolled_train": ("uncontrolled", "train_acc"), "uncontrolled_test": ("uncontrolled", "test_acc"),
    "uncontrolled_on_controlled_test": ("transfer", None),
    "uncontrolled_pairwise_on_controlled_test": ("pairwise", None),
    "controlled_pairwise_test": ("pairwise_controlled", None),
    "cosine_controlled_uncontrolled": ("cosine", None),
}
PROBE_PANELS = (("controlled_test", "context-controlled pairs: held-out accuracy"),
                ("uncontrolled_test", "non-controlled (value text vs neutral): held-out accuracy"),
                ("uncontrolled_on_controlled_test", "non-controlled probe on controlled pairs: accuracy"),
                ("uncontrolled_pairwise_on_controlled_test", "non-controlled probe: controlled pairs ordered right"))


def write_probe_accuracy(out: Path, ident: dict) -> dict:
  """probe_accuracy.json/csv/png: per value and layer, train and held-out accuracy of both
  probes, the non-controlled probe on controlled test pairs, and the directions' cosine."""
  values = ident["controlled"].values
  cols = {name: np.asarray(ident[k] if attr is None else getattr(ident[k], attr)) for name, (k, attr) in
          PROBE_COLUMNS.items()}                                                # each [V, L]
  n_layers = cols["controlled_test"].shape[1]
  report.write_csv(out / "probe_accuracy.csv", ["value", "layer"] + list(PROBE_COLUMNS),
                   [[v, l] + [round(float(cols[n][i, l]), 4) for n in PROBE_COLUMNS]
                    for i, v in enumerate(values) for l in range(n_layers)])
  table = {}
  for i, v in enumerate(values):
    table[v] = {n: [round(float(x), 4) for x in cols[n][i]] for n in PROBE_COLUMNS if n.endswith(("test", "controlled"))}
    table[v].update(best_layer=int(np.argmax(cols["controlled_test"][i])),
                    best_controlled_test=round(float(cols["controlled_test"][i].max()), 4))
  engine.atomic_write(out / "probe_accuracy.json", json.dumps(table, indent=2))
  fig, axes = report.figure(1, len(PROBE_PANELS), figsize=(5 * len(PROBE_PANELS), 4.5), sharey=True)
  for ax, (key, title) in zip(axes, PROBE_PANELS):
    for i, v in enumerate(values):
      ax.plot(cols[key][i], label=v)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer")
    ax.axhline(0.5, color="grey", lw=0.5)
  axes[0].set_ylabel("share")
  axes[-1].legend(fontsize=7, loc="lower right")
  report.save_png(fig, out / "probe_accuracy.png")
  return table
