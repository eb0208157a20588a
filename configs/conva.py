"""ConVA study: value probes on context-controlled pairs, gated minimal activation vs baselines.

Run: python -m launch.conva [--config=configs/conva.py] [--config.target_values=power,security ...]
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Models: an embedded name, a Hugging Face directory or a .gguf path.
  c.model = "smollm2-135m-instruct"     # the steered model
  c.judge = "gemma-3-270m"              # value judge and prompt gate read this model's hidden states
  c.dtype = "float32"
  c.layout = "stacked"           # params layout: stacked (scan) or unstacked (unrolled); bench/RESULTS.md
  c.cache_dir = ""
  # Data ('' = shipped files).
  c.target_values = "all"               # comma list of value keys, or "all"
  c.scenarios = ""                      # minimal-pair scenarios (JSONL)
  c.dilemmas = ""                       # held-out test dilemmas (JSONL)
  c.mc = ""                             # multiple-choice capability set (JSONL)
  c.answers = ""                        # labelled answers that validate the judge (JSONL)
  c.judge_answers = ""                  # labelled answers the judge trains on ('' = shipped; 'none' = scenarios only)
  c.prefixes = ""                       # value prefixes: description, high and opposite system prompts (JSONL)
  c.neutral = ""                        # neutral sentences of the non-controlled contrast and the gate (JSONL)
  c.prompts = ""                        # prompt set whose value dilemmas join the gate's positives (JSONL/CSV)
  c.max_dilemmas = 0                    # per value; 0 = all
  c.max_mc = 0                          # 0 = all
  # Identification.
  # Scenarios are split per value (seed probe.seed): detector_frac for the judge and gate only,
  # the rest into probe train / validation (every choice) / test (reported once).
  c.probe = ml_collections.ConfigDict(dict(l2=1e-3, max_iter=500, detector_frac=0.2, val_frac=0.15, test_frac=0.15,
                                           seed=0,
                                           position="generation"))   # generation: chat-formatted pair texts' answer
                                                                      # position, where ConVA edits; text: plain last token
  # Steering sweep: methods x layer ranges x p0 (ConVA) / coefficients (CAA).
  c.methods = "none,prompt,caa,anchor,conva"
  c.layers = "auto"                     # 'auto' (best controlled probes) or ranges such as '8-12,14-18'
  c.layer_threshold = 0.9               # 'auto': steer layers whose validation accuracy reaches this...
  c.layer_exclude_last = 5              # ...except the last few layers
  c.p0s = "0.9"                         # ConVA target probabilities, comma list in (0, 1)
  c.caa_coefs = "4.0"                   # CAA multipliers of the mean-difference vector
  c.remove = False                      # ConVA remove mode: push the probe down to p0 instead of up
  c.gating = "both"                     # gated: every method acts only where the value's gate opens;
                                        # ungated: on every prompt; both: each method both ways
  c.gate_threshold = 0.5                # default gate threshold on the detector's probability
  c.gate_thresholds = ml_collections.ConfigDict({})   # per value overrides, e.g. {"power": 0.6}
  c.controls = True                     # every CAA, ConVA and anchor setting also as its matched random-direction
                                        # control: the same edit norms at the same sites, seeded random directions
  c.robustness = True                   # also run every condition under the opposite prefix
  c.anchor_first_pieces = False         # anchor method: also map multi-token words to their first piece
  c.anchor = ml_collections.ConfigDict(dict(
      mode="target", site="final", objective="mean", margin=3.0, alpha=0.05, lam=0.0, steps=1, max_scale=2.0))
  # Generation.
  c.max_new_tokens = 48
  c.batch_size = 16
  c.bucket = 16
  c.share_batches = True                # rows of different values, conditions and prefixes share a batch where their
                                        # steering is one program (same records; False: one condition per batch)
  c.sample = False
  c.temperature = 0.7
  c.top_k = 0
  c.top_p = 1.0
  c.seed = 0
  # Evaluation and output.
  c.judge_layer = "auto"                # judge features: block of the judge model ('auto': chosen on validation data)
  c.gate_layer = "auto"                 # gate features: likewise
  c.detector_test_frac = 0.3            # held-out share of the detector scenarios (judge and gate accuracy)
  c.detector_l2 = 1e-2                  # L2 of the judge and gate classifiers (on standardised features)
  c.judge_kind = "classifier"           # classifier: per-value classifier over the judge model's hidden states;
                                        # llm: a language model asked whether the answer favours the value
  c.llm_judge = ""                      # model spec of the LLM judge ('' = config.judge)
  c.llm_judge_options = "Yes,No"        # the LLM judge's two answers (each one token for its tokenizer)
  c.judge_threshold = 0.5               # an answer leans towards the value when the judge reads above this
  c.bootstrap = 2000
  # Device mesh: data (batch rows split) x model (weights split, within a host); data 0 = every device left.
  c.mesh = ml_collections.ConfigDict(dict(data=0, model=1))
  c.out_dir = "runs/conva"
  return c
