"""valuedist: measuring and constructing value alignment inside language models (JAX/Flax)."""
from valuedist.config import ModelConfig
from valuedist.model import forward, init_cache, Cache, Intervention, AddToResidual, Compose

__all__ = ["ModelConfig", "forward", "init_cache", "Cache", "Intervention", "AddToResidual", "Compose"]
