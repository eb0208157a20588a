"""Where a model computes a factual recall: activation patching next to attribution patching.

Run: python -m launch.patching [--config=configs/patching.py] [--config.model=gemma-3-270m ...]
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m-instruct"   # an embedded name, a Hugging Face directory or a .gguf path
  c.dtype = "float32"
  c.layout = "stacked"           # params layout: stacked (scan) or unstacked (unrolled); bench/RESULTS.md
  c.cache_dir = ""
  # Prompts: clean '{subject}' -> answer; corrupted = the next pair's subject (a cyclic shift), so
  # the metric is logit(clean answer) - logit(corrupted answer) at the last token.
  c.template = "The capital city of {} is the city of"
  c.answer_prefix = " "          # prepended to each answer before taking its first token
  c.pairs = ("France:Paris,Italy:Rome,Germany:Berlin,Spain:Madrid,Japan:Tokyo,Russia:Moscow,Egypt:Cairo,"
             "China:Beijing,Greece:Athens,England:London,Poland:Warsaw,Austria:Vienna,Ireland:Dublin,"
             "Norway:Oslo,Portugal:Lisbon,Kenya:Nairobi,Peru:Lima,Cuba:Havana,Canada:Ottawa,Sweden:Stockholm")
  # Grids: site -> the axes patched one cell at a time (always 'layer' first).
  c.grids = "resid_pre:layer,position;attn.out:layer,position;mlp.out:layer,position;attn.z:layer,head"
  c.chunk = 8                    # grid cells per vmapped program
  c.bootstrap = 1000             # resamples of the pairs for the agreement CIs
  c.permutations = 1000          # cell permutations for the agreement's null
  c.seed = 0
  # Device mesh: data (pairs split) x model (weights split, within a host); data 0 = every device left.
  c.mesh = ml_collections.ConfigDict(dict(data=0, model=1))
  c.out_dir = "results/patching_smollm2"
  return c
