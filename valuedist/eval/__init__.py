"""Evaluation: judges, likelihood readouts, text metrics and statistics.

  judges       pooled-hidden-state text classifiers
  likelihood   teacher-forced log-probabilities, perplexity, option logits (jitted)
  text_metrics distinct-n, repetition, degeneracy
  stats        bootstrap intervals and effect sizes
"""
