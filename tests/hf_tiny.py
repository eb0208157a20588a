"""Tiny random-weight transformers models of every supported family, built from config classes."""
import numpy as np
import torch
import transformers

from valuedist.model import families, params as P

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(COMMON)),
    "llama-bias-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                        dict(COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama3.1": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                 dict(COMMON, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(COMMON, sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(COMMON)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM,
              dict(COMMON, head_dim=32, hidden_activation="gelu_pytorch_tanh")),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(COMMON, head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(COMMON, head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=96, n_embd=64, n_layer=3, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
}


def build(variant: str, seed: int = 0, **overrides):
  """(torch model in eval mode, valuedist cfg, params) with every weight randomised; overrides
  replace config fields (e.g. vocab_size)."""
  cfg_cls, model_cls, kw = VARIANTS[variant]
  kw = dict(kw, **overrides)
  torch.manual_seed(seed)
  model = model_cls(cfg_cls(**kw)).eval()
  with torch.no_grad():
    for p in model.parameters():       # perturb everything, norms included, so offsets matter
      p.add_(0.05 * torch.randn_like(p))
  cfg = families.config_from_hf(model.config)
  params = P.convert(((k, v.detach().numpy()) for k, v in model.state_dict().items()), cfg)
  return model, cfg, params


def left_padded_batch(rng: np.random.RandomState, vocab: int, lengths, pad_id: int = 0):
  """tokens, mask [B, T] with rows of the given lengths, left padded."""
  t = max(lengths)
  tokens = np.full((len(lengths), t), pad_id, np.int64)
  mask = np.zeros((len(lengths), t), np.int64)
  for i, n in enumerate(lengths):
    tokens[i, t - n:] = rng.randint(3, vocab, n)
    mask[i, t - n:] = 1
  return tokens, mask


def byte_tokenizer(chat_template: str | None = None):
  """A byte-level BPE tokenizer without merges (vocab 256 bytes + 3 specials: ids 256-258)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
  for s in ("<pad>", "<s>", "</s>"):
    vocab[s] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                              eos_token="</s>")
  if chat_template:
    fast.chat_template = chat_template
  return fast


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def save_model_dir(path, variant: str, seed: int = 0, chat_template: str | None = None, max_positions: int = 256):
  """Writes a tiny random HF model directory (config, safetensors, byte tokenizer) for `variant`,
  with a vocabulary that covers the byte tokenizer. Returns the path."""
  cfg_cls, model_cls, kw = VARIANTS[variant]
  kw = dict(kw, vocab_size=259, pad_token_id=256, bos_token_id=257, eos_token_id=258)
  if variant == "gpt2":
    kw["n_positions"] = max_positions
  else:
    kw["max_position_embeddings"] = max_positions
  torch.manual_seed(seed)
  model = model_cls(cfg_cls(**kw)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  byte_tokenizer(chat_template).save_pretrained(path)
  return path
