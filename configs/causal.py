"""Causal value structure: value scores under roles, PC graph, human comparison, role and SAE steering.

Run: python -m launch.causal [--config=configs/causal.py] [--config.models=smollm2-135m-instruct,gemma-3-270m ...]
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.models = "smollm2-135m-instruct"    # comma list of model specs (embedded names, HF dirs, .gguf files)
  c.dtype = "float32"
  c.layout = "stacked"           # params layout: stacked (scan) or unstacked (unrolled); bench/RESULTS.md
  c.cache_dir = ""
  # Data ('' = shipped files).
  c.questionnaire = ""                  # portrait items (JSONL: id, value, text)
  c.min_items = 6                       # items every value needs
  c.roles = ""                          # roles (JSONL: id, group, role)
  c.max_roles = 0                       # 0 = all
  c.scenarios = ""                      # minimal-pair scenarios: value features and SAE corpus (JSONL)
  c.prompts = ""                        # prompt set of the SAE corpus (and the model's own answers to it)
  c.dilemmas = ""                       # dilemma questions of the SAE corpus (JSONL)
  # Causal discovery and comparison.
  c.alpha = 0.05                        # PC significance level (Fisher-z)
  c.bootstrap = 100                     # resamples for edge stability and the agreement figures' CIs
  c.null_draws = 1000                   # null draws per agreement figure (random graphs, permuted scores)
  c.reference = ""                      # '' = Schwartz circumplex; else a CSV human correlation matrix
  c.reference_edge_threshold = 0.3      # |r| at or above which the file's pair counts as an edge
  c.side_effect_threshold = 0.05        # |score change| that counts as an observed side effect
  # Sparse autoencoder.
  c.sae = ml_collections.ConfigDict(dict(
      enabled=True,
      path="",                          # '' = train one; else a .npz/.safetensors SAE (Gemma Scope layout)
      kind="",                          # for a loaded file: jumprelu / topk ('' = by its arrays)
      layer=-1,                         # -1 = the middle layer
      width=2304, k=32, steps=1500, batch=1024, lr=1e-3, ckpt_every=250,
      corpus_new_tokens=48,             # the model's own answers to the shipped prompts join the corpus (0 = none)
      max_tokens=128,                   # tokens kept per corpus text
      top_features=5,                   # latents ranked per value (the top one steers; none is a random-latent control)
      held_out=0.25,                    # share of each value's scenarios held out of feature selection (checked there)
      # add: unit decoder direction x coef x the layer's median residual norm (corpus tokens, sinks excluded);
      # clamp: latent := coef x its mean active value. Every coefficient also runs a random latent and a
      # random direction of the same norm (controls) through the same program.
      mode="add",
      coefs=(-1.0, -0.5, -0.25, -0.1, -0.05, 0.05, 0.1, 0.25, 0.5, 1.0),   # dose-response (units as per mode)
      # all: every position, generated tokens included; prompt: every prompt position (answer position
      # included), no generated token. Questionnaire scores come from one pass over the prompt, so the two
      # give the same scores here (they differ in generation only).
      positions="all",
  ))
  # Batching and output.
  c.share_batches = True                # SAE sweep rows of different values, kinds and coefficients share batches
                                        # (False: one condition per batch, the unit-by-unit way; the same scores)
  c.batch_size = 16
  c.bucket = 16
  c.seed = 0
  # Device mesh: data (batch rows split) x model (weights split, within a host); data 0 = every device left.
  c.mesh = ml_collections.ConfigDict(dict(data=0, model=1))
  c.out_dir = "runs/causal"
  return c
