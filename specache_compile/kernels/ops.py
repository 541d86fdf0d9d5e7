"""The kernels the runtime and policies call, as torch.library ops, re-exported from one place.

Each op has a pure-torch implementation in ``kernels/reference.py`` registered for every device (the CPU kernel, and
the CUDA one until a Triton kernel registers itself for CUDA) and a fake impl so torch.compile can trace it. The
kernels package is a leaf: it imports nothing else of specache (the op the pass inserts, ``specache::attend``, lives
in ``specache_compile/attend_op.py``, above the runtime it calls).
"""

from __future__ import annotations

import torch

# -- kernels (one module per family; re-exported here so callers import one place) ---------------------------------
from .attn_ops import (  # noqa: E402,F401
    exact_attention,
    lowbit_decode_attention,
    lowbit_scores,
    sparse_attention,
    topk_positions,
)
from .fused_ops import fused_decode, fused_decode_supported  # noqa: E402,F401
from .quant_ops import (  # noqa: E402,F401
    dequantize_keys,
    dequantize_values,
    gather_rows,
    quantize_keys,
    quantize_values,
)

# -- small helpers the runtime shares -------------------------------------------------------------------------------


def attention_logits(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """scale · q kᵀ in float32, GQA-aware. q: [B, Hq, Sq, D], k: [B, Hkv, N, D] -> [B, Hq, Sq, N]."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(b, hkv, (hq // hkv) * sq, d)
    return (softmax_scale * qg @ k.float().transpose(-1, -2)).reshape(b, hq, sq, k.shape[2])


def attention_bias(
    mask: torch.Tensor | None, is_causal: bool, sq: int, ncols: int, device: torch.device
) -> torch.Tensor | None:
    """The additive float32 bias equivalent to SDPA's (attn_mask, is_causal) over an [Sq, ncols] score matrix.

    A bool mask means True = attend (SDPA's convention); a float mask is added as is. is_causal is SDPA's top-left
    aligned lower triangle.
    """
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))
        else:
            bias = mask.to(device=device, dtype=torch.float32)
    if is_causal:
        tri = torch.ones(sq, ncols, dtype=torch.bool, device=device).tril_()
        causal = torch.zeros(sq, ncols, dtype=torch.float32, device=device).masked_fill_(~tri, float("-inf"))
        bias = causal if bias is None else bias + causal
    return bias
