"""Greedy generation with SpeCache's speculative prefetch (Algorithms 1-3 of the paper).

``model.generate`` feeds one token per step, so a compiled model decodes with on-demand fetches there (the fetch waits
for the real query). ``specache.generate`` drives the model the way SpeCache does:

1. prefill (Algorithm 1), optionally in chunks: every layer's KV goes to the host store as it is produced, so the
   device never holds the context's full KV;
2. pre-decoding (Algorithm 2): the first generated token T1 attends to the low-bit copy only and is not stored; its
   logits give the first speculative token T'2 and its queries start the first prefetch;
3. each step t feeds [T_t, T'_{t+1}] (Algorithm 3): row 0 is the real token, stored; row 1 the speculative one,
   attended (it sees row 0) but never stored. Row 0's logits give T_{t+1}; row 1's give T'_{t+2}; row 1's
   per-layer attention picks the next step's top-k, fetched on the side stream while the step goes on.

The model's own cache grew by the speculative token; it is cropped back (``DynamicCache.crop``) or, for a cache
written by position (StaticCache), simply overwritten next step. Greedy only (argmax), no stopping on EOS: the output
is always ``max_new_tokens`` long, which is what the benchmarks and the harness need.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from .runtime.runtime import LOOKAHEAD, NORMAL, SPECULATIVE


def _drop_last(cache) -> None:
    """Make the model's cache forget its last token (the speculative one, or T1 after pre-decoding)."""
    if type(cache).__name__ == "DynamicCache" and hasattr(cache, "crop"):
        cache.crop(-1)  # a negative count removes tokens (transformers 5.2x accepts only that; 5.1x both)
        return
    for layer in getattr(cache, "layers", []):
        n = getattr(layer, "cumulative_length", None)  # StaticLayer (5.2x) counts written tokens on the device
        if isinstance(n, torch.Tensor):
            n.sub_(1)  # in place: the compiled graph holds its address
        elif isinstance(n, int):
            layer.cumulative_length = n - 1
    # caches written at the given cache_position (StaticCache in 5.1x) need nothing: the next step overwrites


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # mask: [B, S] 1 = real token; left padding gets position 1 as transformers' generate does
    return (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    speculative: bool | None = None,
    prefill_chunk: int | None = None,
    on_step: Any = None,
    suppress_tokens: list[int] | None = None,
) -> torch.Tensor:
    """Greedy decode ``max_new_tokens`` tokens after ``input_ids`` [B, S] with a specache-compiled transformers model.
    Returns [B, max_new_tokens].

    speculative: None = the model's Config.speculative (when its policy supports it). prefill_chunk: prefill this many
    tokens per call (bounds activation memory at long contexts; policies that keep no full KV prefill in one call).
    past_key_values: a transformers cache to fill (default: a new DynamicCache). on_step(i): called after each step
    (the benchmarks time steps with it). suppress_tokens: never generate these (pass the EOS ids to match
    ``model.generate(..., min_new_tokens=n)``, which masks EOS until n tokens exist).
    """
    from transformers import DynamicCache

    from .api import runtime_of

    if input_ids.dim() != 2:
        raise ValueError(f"specache.generate: input_ids expected [B, S], got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"specache.generate: max_new_tokens expected an int >= 1, got {max_new_tokens!r}")
    b, s = input_ids.shape
    dev = input_ids.device
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    cache = past_key_values if past_key_values is not None else DynamicCache()
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 2  # decode calls need at most two rows of logits

    runtime = None  # the model's specache runtime (read by call() when it runs, so it sees the later binding)

    def call(ids: torch.Tensor, m: torch.Tensor, start: int):
        n = ids.shape[1]
        pos = _positions(m)[:, -n:]
        before = runtime.calls if runtime is not None else 0
        out = model(input_ids=ids, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(start, start + n, device=dev), **kwargs)
        if runtime is not None and runtime.calls == before:
            # Dynamo ran the model without our graph (recompile limit hit, or compilation disabled): its attention
            # read the placeholder cache. Refuse rather than return tokens computed from zeros.
            raise RuntimeError(
                "specache.generate: the model ran without specache's compiled graph (no attention reached the "
                "runtime), e.g. torch._dynamo's recompile_limit was hit. Fix: torch._dynamo.reset() between models, "
                "or raise torch._dynamo.config.recompile_limit."
            )
        logits = out.logits
        if suppress_tokens:
            logits = logits.clone()
            logits[..., list(suppress_tokens)] = float("-inf")
        return logits

    # -- 1. prefill -----------------------------------------------------------------------------------------------
    try:
        runtime = runtime_of(model)
        runtime.capacity_hint = s + max_new_tokens + 1  # the host store is allocated once, pinned, at this size
    except ValueError:  # torch.compile(backend="specache"): the runtime appears with the first call
        pass
    logits = None
    chunk = prefill_chunk or s
    if runtime is not None and not runtime.policy.uses_store:
        chunk = s  # one call: this policy keeps no full KV for a later chunk to attend to
    a = 0
    while a < s:
        e = min(s, a + chunk)
        logits = call(input_ids[:, a:e], mask[:, :e], a)
        if runtime is None:
            runtime = runtime_of(model)
        a = e
    if speculative is None:
        speculative = runtime.config.speculative
    speculative = speculative and runtime.policy.speculative
    tok = logits[:, -1].argmax(-1, keepdim=True)  # T1
    out = [tok]
    p = s  # position of the next real token
    crop = functools.partial(_drop_last, cache)

    if not speculative:
        for i in range(max_new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
            with runtime.stepping(NORMAL):
                logits = call(tok, mask, p)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            p += 1
            if on_step is not None:
                on_step(i)
        runtime.check_deferred()
        return torch.cat(out, dim=1)

    # -- 2. pre-decoding: T1 against the low-bit copy, not stored; gives T'2 and the first prefetch ----------------
    mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)  # T1's column
    with runtime.stepping(LOOKAHEAD):
        logits = call(tok, mask, p)
    spec = logits[:, -1].argmax(-1, keepdim=True)  # T'2
    crop()
    # -- 3. steps: [T_t, T'_{t+1}] -> T_{t+1}, T'_{t+2} -------------------------------------------------------------
    for i in range(max_new_tokens - 1):
        m2 = torch.cat([mask, mask.new_ones((b, 1))], dim=1)  # + the speculative token's column
        with runtime.stepping(SPECULATIVE):
            logits = call(torch.cat([tok, spec], dim=1), m2, p)
        tok = logits[:, -2].argmax(-1, keepdim=True)
        spec = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
        p += 1
        mask = m2
        crop()  # drop the speculative token from the model's cache
        if on_step is not None:
            on_step(i)
    runtime.check_deferred()
    return torch.cat(out, dim=1)
