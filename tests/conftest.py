import jax

# f32 parity with PyTorch needs full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
