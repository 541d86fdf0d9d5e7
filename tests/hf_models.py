"""Tiny transformers models built from configs with random weights, shared by the tests and the demo."""

from __future__ import annotations

import torch

VOCAB = 128


# Llama-like configs: name -> (transformers config class, extra fields)
_MORE = {
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {"sliding_window": 16}),  # attention logit soft-capping (tanh): left alone
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 16}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}),
    "cohere": ("CohereConfig", {}),
    "starcoder2": ("Starcoder2Config", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {}),
    "phi": ("PhiConfig", {}),
    "stablelm": ("StableLmConfig", {}),
}


def config(arch: str, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 2, **extra):
    import transformers as tf

    hidden = heads * head_dim
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=extra.pop("sliding_window", 16))
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**common, sliding_window=None)
    elif arch in _MORE:  # the architectures of tests/models/test_hf.py's wider sweep (head_dim given explicitly)
        cfg = getattr(tf, _MORE[arch][0])(**common, head_dim=head_dim, **_MORE[arch][1])
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=512,
                               pad_token_id=0, bos_token_id=1, eos_token_id=None)
    elif arch == "falcon":
        cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              num_kv_heads=kv_heads, new_decoder_architecture=True, pad_token_id=0, bos_token_id=1,
                              eos_token_id=None)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, max_position_embeddings=512, word_embed_proj_dim=hidden,
                           pad_token_id=0, bos_token_id=1, eos_token_id=None)
    elif arch == "bloom":  # ALiBi through alibi.baddbmm(q, kᵀ): an attention the pass leaves alone
        cfg = tf.BloomConfig(vocab_size=VOCAB, hidden_size=hidden, n_layer=layers, n_head=heads, pad_token_id=0,
                             bos_token_id=1, eos_token_id=None)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                            pad_token_id=0, bos_token_id=1, eos_token_id=None)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def build(arch: str, attn: str = "sdpa", dtype=torch.float32, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config(arch, **kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    return model


def twin(model):
    """An independent copy with the same weights (one to compile, one to compare against)."""
    import copy

    return copy.deepcopy(model)
