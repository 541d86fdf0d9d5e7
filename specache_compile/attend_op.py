"""``specache::attend``, the op the pass puts where an attention was, and ``specache::refuse``.

``attend`` is opaque on purpose: it writes the new tokens to the runtime's store (state outside the graph) and runs
the policy, whose work depends on the step (prefill or decode) and on what the store holds. Its inputs carry every
dependency it has on the graph, and its output is always used, so neither dead-code elimination nor reordering can
drop or move it across its consumers. It sits between the pass and the runtime: graph -> pass -> this op -> runtime
-> kernels.
"""

from __future__ import annotations

import torch

from .runtime import runtime as rt
from .runtime.runtime import CacheMismatch


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
    raise CacheMismatch(message)


@refuse.register_fake
def _(x, message):
    return torch.empty_like(x)
