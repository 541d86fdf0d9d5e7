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

from . import reference as ref

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


# -- kernels --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("specache::quantize_keys", mutates_args=())
def quantize_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ref.quantize_keys(k, bits, group)


@quantize_keys.register_fake
def _(k, bits, group):
    b, h, s, d = k.shape
    return (k.new_empty((b, h, s, d * bits // 8), dtype=torch.uint8), k.new_empty((b, h, s // group, d)),
            k.new_empty((b, h, s // group, d)))


@torch.library.custom_op("specache::quantize_values", mutates_args=())
def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ref.quantize_values(v, bits, group)


@quantize_values.register_fake
def _(v, bits, group):
    b, h, s, d = v.shape
    g = min(group, d)
    return (v.new_empty((b, h, s, d * bits // 8), dtype=torch.uint8), v.new_empty((b, h, s, d // g)),
            v.new_empty((b, h, s, d // g)))


@torch.library.custom_op("specache::dequantize_keys", mutates_args=())
def dequantize_keys(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    return ref.dequantize_keys(packed, scale, zero, bits, group, dtype)


@dequantize_keys.register_fake
def _(packed, scale, zero, bits, group, dtype):
    b, h, s, p = packed.shape
    return packed.new_empty((b, h, s, p * 8 // bits), dtype=dtype)


@torch.library.custom_op("specache::dequantize_values", mutates_args=())
def dequantize_values(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    return ref.dequantize_values(packed, scale, zero, bits, group, dtype)


@dequantize_values.register_fake
def _(packed, scale, zero, bits, group, dtype):
    b, h, s, p = packed.shape
    return packed.new_empty((b, h, s, p * 8 // bits), dtype=dtype)


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


def gather_rows(
    src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Rows idx [B, H, K] of src [B, H, S, D] (host or device) on ``device``: [B, H, K, D].

    Not a torch.library op: it moves data between memories and runs only inside the runtime, never in a graph.
    """
    if out is None and device is not None and torch.device(device) != src.device:
        out = torch.empty((*idx.shape, src.shape[-1]), dtype=src.dtype, device=device)
    return ref.gather_rows(src, idx, out)


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float
) -> torch.Tensor:
    """SDPA over full-precision k, v [B, Hkv, N, D] (GQA through enable_gqa): prefill attention."""
    hq, hkv = q.shape[1], k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=hq != hkv
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
