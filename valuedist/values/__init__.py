"""The science as library functions (jit-compatible where they touch the model).

  anchors         anchor words -> token ids
  gap             anchor-word gap statistics (with and without the vocabulary projection)
  anchor_edit     anchor-word editing of the last hidden state; logit-bias baseline
  controls        matched random-direction controls of the steering edits (same norms, same sites)
  probes          linear probes (batched L-BFGS logistic regression)
  conva           ConVA: value probes, gated minimal value-vector activation, CAA deltas
  questionnaire   portrait-questionnaire scores from option-token logits
  causal_graph    PC graphs with bootstrap stability, agreement with the circumplex, side effects
  sae             sparse autoencoders (TopK, JumpReLU): load, train, quality, steering
"""
