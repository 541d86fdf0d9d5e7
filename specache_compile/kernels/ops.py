"""torch.library ops of specache: what the pass inserts, and the kernels the runtime and policies call.

Each op has a pure-torch implementation in ``kernels/reference.py`` registered for every device (the CPU kernel, and
the CUDA one until a Triton kernel registers itself for CUDA) and a fake impl so torch.compile can trace it.

``specache::attend`` is the op the pass puts where an attention was. It is opaque on purpose: it writes the new
tokens to the runtime's store (state outside the graph) and runs the policy, whose work depends on the step (prefill
or decode) and on what the store holds. Its inputs carry every dependency it has on the graph, and its output is
always used, so neither dead-code elimination nor reordering can drop or move it across its consumers.
"""

from __future__ import annotations

import torch

# -- the op the pass inserts ----------------------------------------------------------------------------------------


@torch.library.custom_op("specache::attend", mutates_args=())
def attend(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor | None,
    write_pos: torch.Tensor | None,
    base_len: int,
    col_start: int | None,
    col_stop: int | None,
    mode: int,
    scale: float,
    is_causal: bool,
    handle: int,
    site: str,
) -> torch.Tensor:
    """Attention of q over the site's stored KV plus (k_new, v_new), which it appends. Returns [B, Hq, Sq, Dv].

    base_len / col_start / col_stop / mode say which stored positions the original attention read (see
    runtime.runtime.APPEND and INDEX); handle names the runtime, site the attention within it.
    """
    from ..runtime import runtime as rt  # late: runtime imports this module

    return rt.get(handle).attend(
        q, k_new, v_new, mask, write_pos, base_len, col_start, col_stop, mode, scale, is_causal, site
    )


@attend.register_fake
def _(q, k_new, v_new, mask, write_pos, base_len, col_start, col_stop, mode, scale, is_causal, handle, site):
    return q.new_empty((*q.shape[:-1], v_new.shape[-1]))


# -- kernels (one module per family; re-exported here so callers import one place) ---------------------------------

from .attn_ops import (  # noqa: E402,F401
    exact_attention,
    lowbit_decode_attention,
    lowbit_scores,
    sparse_attention,
    topk_positions,
)
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
