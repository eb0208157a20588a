"""Model surgery for interpretability, on the named sites of `model.sites`.

  patching  run_with_cache, activation patching over a (layer, position, head) grid, and
            attribution patching (gradient x activation difference) for many sites in one
            backward pass
  lens      logit lens, per-head outputs, direct logit attribution
"""
