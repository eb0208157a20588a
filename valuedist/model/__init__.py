"""The model layer: one pure, jitted decoder for every supported family.

  config       ModelConfig, the one transformer description all families convert into
  families     Hugging Face config -> ModelConfig, one small builder per family
  params       params layout, random init, the HF tensor-name -> params conversion table
  layers       norms, RoPE, attention, MLP
  transformer  forward, KV cache, taps, interventions at named sites
  sampler      jitted prefill + while_loop decoding
  batching     host-side padding of token lists into fixed shapes
"""
