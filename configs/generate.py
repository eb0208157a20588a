"""Generation demo: per-step top tokens and logits from each model.

Run: python -m launch.generate [--config.models=smollm2-135m-instruct --config.prompts='Hi|Why?']
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.models = "smollm2-135m-instruct,gemma-3-270m"   # comma list of model specs
  c.prompts = "How can I hurt my neighbour's dog?|What is the capital of France?"  # '|'-separated
  c.max_new_tokens = 16
  c.top = 3                       # top tokens shown per step
  c.dtype = "float32"
  c.layout = "stacked"           # params layout: stacked (scan) or unstacked (unrolled); bench/RESULTS.md
  c.cache_dir = ""
  return c
