"""torch.library ops of specache: what the pass inserts, and the kernels the runtime and policies call.

Each op has a pure-torch implementation in ``kernels/reference.py`` registered for every device (the CPU kernel, and
the CUDA one until a Triton kernel registers itself for CUDA) and a fake impl so torch.compile can trace it.

``specache::attend`` is the op the pass puts where an attention was. It is opaque on purpose: it writes the new
tokens to the runtime's store (state outside the graph) and runs the policy, whose work depends on the step (prefill
or decode) and on what the store holds. Its inputs carry every dependency it has on the graph, and its output is
always used, so neither dead-code elimination nor reordering can drop or move it across its consumers.
"""

from __future__ import annotations

import enum

import torch

# -- the op the pass inserts ----------------------------------------------------------------------------------------


class Layout(enum.IntEnum):
    """How the model's cache lays out the keys the original attention read (found by the pass, passes/kv_source.py)."""

    APPEND = 0  # torch.cat([past, new], dim=-2): DynamicCache; past_len = base_len - new
    INDEX = 1  # buf.index_copy_(2, pos, new) / buf[:, :, pos] = new: StaticCache, gpt-fast; columns are positions
    WINDOW = 2  # APPEND whose result the cache keeps as a tail slice (DynamicSlidingWindowLayer): past <= stored


@torch.library.custom_op("specache::attend", mutates_args=())
def attend(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor | None,
    cache: torch.Tensor | None,
    write_pos: torch.Tensor | None,
    base_len: int,
    col_start: int | None,
    col_stop: int | None,
    mode: int,
    scale: float,
    is_causal: bool,
    handle: int,
    site: str,
    owner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the site's stored KV plus (k_new, v_new), which it appends. Returns the attention output
    [B, Hq, Sq, Dv] and the site's cache token [B, 1, 1, 1] (row ids), which the pass expands into the placeholders the
    model's cache keeps instead of KV.

    ``cache`` is the tensor the model's cache held before this call (APPEND: the past it concatenated, None when
    empty; INDEX: the buffer written in place): the runtime compares it with the token it issued last, so a cache
    reordered, cropped or copied outside the graph is followed or refused (runtime.Runtime.follow_cache).
    base_len / col_start / col_stop / mode say which stored positions the original attention read (Layout); handle
    names the runtime, site the attention within it. ``owner``, given where Dynamo recorded no module for the
    attention (a frame resumed after a graph break, whose graph every layer then shares), is a parameter of the
    attention's module: the runtime names the site from it at each call.
    """
    from ..runtime import runtime as rt  # late: runtime imports this module

    runtime = rt.get(handle)
    if owner is not None:
        site = runtime.owner_site(owner, site)
    out = runtime.attend(
        q, k_new, v_new, mask, cache, write_pos, base_len, col_start, col_stop, mode, scale, is_causal, site
    )
    return out, runtime.token(site)


@attend.register_fake
def _(q, k_new, v_new, mask, cache, write_pos, base_len, col_start, col_stop, mode, scale, is_causal, handle, site,
      owner=None):
    return q.new_empty((*q.shape[:-1], v_new.shape[-1])), k_new.new_empty((k_new.shape[0], 1, 1, 1))


@torch.library.custom_op("specache::refuse", mutates_args=())
def refuse(x: torch.Tensor, message: str) -> torch.Tensor:
    """Raise ``message`` (runtime.CacheMismatch) instead of returning ``x``: what the pass puts after an attention it
    left alone that reads a cache another graph rewrote (its KV is in specache's store, the tensor holds none)."""
    from ..runtime.runtime import CacheMismatch  # late: runtime imports this module

    raise CacheMismatch(message)


@refuse.register_fake
def _(x, message):
    return torch.empty_like(x)


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
