"""The model layer: one pure, jitted decoder for every supported family.

  config       ModelConfig, the one transformer description all families convert into
  families     Hugging Face config -> ModelConfig, one small builder per family
  params       params layout, random init, the HF tensor-name -> params conversion table
  layers       norms, RoPE, attention, MLP
  sites        the named sites (embed, per block resid_pre .. resid_post, final, logits), the
               Context an edit sees, the Intervention base and Compose
  edits        generic edits at any site: Add, Set, Scale, Ablate, Patch, selected by Where;
               AddToResidual (the steering-vector layout)
  transformer  forward (taps and edits at every site) and its KV cache
  sampler      jitted prefill + while_loop decoding
  batching     host-side padding of token lists into fixed shapes
"""
