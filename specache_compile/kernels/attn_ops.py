"""Ops that score the low-bit copy, pick the top-k, and attend over the chosen tokens.

Each op: a pure-torch reference (reference.py) for every device until a Triton kernel registers for CUDA, and a fake.
"""

from __future__ import annotations

import torch

from . import reference as ref


@torch.library.custom_op("specache::lowbit_scores", mutates_args=())
def lowbit_scores(
    q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
    softmax_scale: float,
) -> torch.Tensor:
    return ref.lowbit_scores(q, packed, scale, zero, bits, group, softmax_scale)


@lowbit_scores.register_fake
def _(q, packed, scale, zero, bits, group, softmax_scale):
    return q.new_empty((*q.shape[:3], packed.shape[2]), dtype=torch.float32)


@torch.library.custom_op("specache::topk_positions", mutates_args=())
def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    return ref.topk_positions(scores, k)


@topk_positions.register_fake
def _(scores, k):
    return scores.new_empty((*scores.shape[:2], max(0, min(k, scores.shape[2]))), dtype=torch.int64)


@torch.library.custom_op("specache::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, softmax_scale: float
) -> torch.Tensor:
    return ref.sparse_attention(q, k, v, bias, softmax_scale)


@sparse_attention.register_fake
def _(q, k, v, bias, softmax_scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float
) -> torch.Tensor:
    """SDPA over full-precision k, v [B, Hkv, N, D] (GQA through enable_gqa): prefill attention."""
    hq, hkv = q.shape[1], k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=hq != hkv
    )
