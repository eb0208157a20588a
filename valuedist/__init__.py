"""valuedist: measuring and constructing value alignment inside language models (JAX/Flax).

Layers, each importing only from those above it (`data` is a leaf any layer may read):
  model        the pure decoder: config, families, params, layers, transformer, sampler
  parallel     device mesh and partition specs
  checkpoints  Hugging Face directories, GGUF files, embedded models, the conversion cache
  values       the science as library functions: anchors, gap, anchor editing, probes,
               ConVA, questionnaire scoring, causal graphs, sparse autoencoders
  eval         judges, likelihood readouts, text metrics, statistics
  studies      the pipelines behind launch/: one engine, one report module, gap, conva, causal
  data         project-written data, loaders, tfds builders
"""
from valuedist.model.config import ModelConfig
from valuedist.model.transformer import forward, init_cache, Cache, Intervention, AddToResidual, Compose

__all__ = ["ModelConfig", "forward", "init_cache", "Cache", "Intervention", "AddToResidual", "Compose"]
