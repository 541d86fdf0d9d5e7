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


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its cache by: ``cache`` in transformers releases that renamed it,
    ``past_key_values`` before (both are supported; the old name warns where the new one exists)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    past_key_values: Any = None,
    speculative: bool | None = None,
    prefill_chunk: int | None = None,
    on_step: Any = None,
    suppress_tokens: list[int] | None = None,
    cuda_graph: bool = False,
    forced_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy decode ``max_new_tokens`` tokens after ``input_ids`` [B, S] with a specache-compiled transformers model.
    Returns [B, max_new_tokens].

    speculative: None = the model's Config.speculative (when its policy supports it). prefill_chunk: prefill this many
    tokens per call (bounds activation memory at long contexts; policies that keep no full KV prefill in one call).
    cache (or its older name past_key_values, which transformers is renaming): a transformers cache to fill
    (default: a new DynamicCache; a StaticCache of prompt + new tokens
    + 2 positions for a model compiled with ``policy_options={"static": True}``). on_step(i): called after each step
    (the benchmarks time steps with it). suppress_tokens: never generate these (pass the EOS ids to match
    ``model.generate(..., min_new_tokens=n)``, which masks EOS until n tokens exist).
    cuda_graph: replay the speculative steps as CUDA graphs (two, one per prefetch slot parity), captured after two
    warm-up steps: needs CUDA, the specache policy with ``policy_options={"static": True}``
    (policies/specache_static.py) and a StaticCache with room for the prompt and every new token plus one (the default
    cache of such a model).
    forced_tokens: [B, max_new_tokens] tokens to feed instead of the model's own (teacher forcing: step i feeds
    forced_tokens[:, i]); the return value is then what the model predicted at each position given the forced ones
    before it, so ``(generate(..., forced_tokens=ref) == ref).float().mean()`` is next-token agreement with ``ref``.
    The speculative token is still the model's own prediction. Not with cuda_graph.
    """
    from transformers import DynamicCache

    from .api import runtime_of

    if input_ids.dim() != 2:
        raise ValueError(f"specache.generate: input_ids expected [B, S], got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"specache.generate: max_new_tokens expected an int >= 1, got {max_new_tokens!r}")
    b, s = input_ids.shape
    dev = input_ids.device
    if forced_tokens is not None:
        if cuda_graph:
            raise ValueError("specache.generate: forced_tokens expected with cuda_graph=False, got cuda_graph=True; "
                             "fix: teacher-force without CUDA graphs")
        if not isinstance(forced_tokens, torch.Tensor) or tuple(forced_tokens.shape) != (b, max_new_tokens):
            tensor = isinstance(forced_tokens, torch.Tensor)
            got = tuple(forced_tokens.shape) if tensor else type(forced_tokens).__name__
            raise ValueError(f"specache.generate: forced_tokens expected shape {(b, max_new_tokens)} "
                             f"([B, max_new_tokens] tensor), got {got}")
        forced_tokens = forced_tokens.to(device=dev, dtype=input_ids.dtype)

    def fed(pred: torch.Tensor, i: int) -> torch.Tensor:
        # the token the next step feeds as new token i: the model's own, or the forced one
        return pred if forced_tokens is None else forced_tokens[:, i : i + 1]

    if cache is not None and past_key_values is not None:
        raise ValueError("specache.generate: expected one of cache= and past_key_values= (two names of one argument), "
                         "got both; fix: pass cache= only")
    past_key_values = cache if cache is not None else past_key_values
    cache_kw = cache_keyword(model)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    if past_key_values is None and _static_policy(model):
        # the static path decodes into a StaticCache only (fixed shapes): one with room for this call's tokens
        from transformers import StaticCache

        past_key_values = StaticCache(config=model.config, max_cache_len=s + max_new_tokens + 2)
    cache = past_key_values if past_key_values is not None else DynamicCache()
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 2  # decode calls need at most two rows of logits

    runtime = None  # the model's specache runtime (read by call() when it runs, so it sees the later binding)

    def call(ids: torch.Tensor, m: torch.Tensor, start: int):
        n = ids.shape[1]
        pos = _positions(m)[:, -n:]
        before = runtime.calls if runtime is not None else 0
        out = model(input_ids=ids, attention_mask=m, position_ids=pos, **{cache_kw: cache}, use_cache=True,
                    cache_position=torch.arange(start, start + n, device=dev), **kwargs)
        if runtime is not None and runtime.calls == before:
            if not runtime.sites:
                _refuse_unrewritten(runtime)
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

    if cuda_graph:
        _check_graphable(model, input_ids, max_new_tokens, past_key_values, speculative)
    # -- 1. prefill -----------------------------------------------------------------------------------------------
    try:
        runtime = runtime_of(model)
        runtime.capacity_hint = s + max_new_tokens + 1  # the host store is allocated once, pinned, at this size
        if runtime.policy.static:
            # the static path writes the store by cache position, up to the StaticCache's capacity: allocate that
            # up front (reserving it later grew the store by a quarter, and the pinned allocator keeps the old block)
            runtime.capacity_hint = max(runtime.capacity_hint, _capacity(past_key_values) or 0)
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
    pred = logits[:, -1].argmax(-1, keepdim=True)  # T1
    out = [pred]
    tok = fed(pred, 0)
    p = s  # position of the next real token
    crop = functools.partial(_drop_last, cache)

    if not speculative:
        for i in range(max_new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
            with runtime.stepping(NORMAL):
                logits = call(tok, mask, p)
            pred = logits[:, -1].argmax(-1, keepdim=True)
            out.append(pred)
            tok = fed(pred, i + 1)
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
    if cuda_graph:
        rest = _fixed_buffer_steps(model, runtime, cache, kwargs, tok, spec, mask, p, max_new_tokens - 1, on_step,
                                   suppress_tokens, capture=dev.type == "cuda")
        runtime.check_deferred()
        return torch.cat([tok, rest], dim=1)
    # -- 3. steps: [T_t, T'_{t+1}] -> T_{t+1}, T'_{t+2} -------------------------------------------------------------
    for i in range(max_new_tokens - 1):
        m2 = torch.cat([mask, mask.new_ones((b, 1))], dim=1)  # + the speculative token's column
        with runtime.stepping(SPECULATIVE):
            logits = call(torch.cat([tok, spec], dim=1), m2, p)
        pred = logits[:, -2].argmax(-1, keepdim=True)
        spec = logits[:, -1].argmax(-1, keepdim=True)
        out.append(pred)
        tok = fed(pred, i + 1)
        p += 1
        mask = m2
        crop()  # drop the speculative token from the model's cache
        if on_step is not None:
            on_step(i)
    runtime.check_deferred()
    return torch.cat(out, dim=1)


# -- CUDA graphs over the speculative steps ---------------------------------------------------------------------------


def _refuse_unrewritten(runtime) -> None:
    """Raise if the pass rewrote no attention of the model at all (none found, or every one left alone): there is no
    store to decode from, and the model's own attention ran (its output is the unmodified model's)."""
    reports = [r for rs in runtime.graph_stats.values() for r in rs]
    if any(r.status != "skipped" for r in reports):
        return
    if not reports:
        why = "the pass found no attention in the model's graphs"
    else:
        names = sorted({r.site for r in reports})
        why = (f"every attention the pass found ({len(names)}) keeps its original code; {names[0]}: "
               f"{reports[0].reason}")
    raise ValueError(
        f"specache.generate: expected a model with attention specache rewrites, got one where {why}. Fix: run the "
        "model without specache (model.generate), or see specache.stats(model) for each attention's reason."
    )


def _capacity(cache) -> int | None:
    """Positions of a cache written by position (StaticCache: every layer's max_cache_len), else None."""
    layers = getattr(cache, "layers", None)
    if not layers or type(cache).__name__ == "DynamicCache":
        return None
    caps = {getattr(layer, "max_cache_len", None) for layer in layers}
    cap = caps.pop() if len(caps) == 1 else None
    return cap if isinstance(cap, int) and cap > 0 else None


def _static_policy(model) -> bool:
    from .api import runtime_of

    try:
        return runtime_of(model).policy.static_required
    except ValueError:  # not compiled by specache.compile (or the runtime appears with the first call)
        return False


def _check_graphable(model, input_ids, max_new_tokens, cache, speculative) -> None:
    from .api import runtime_of

    problems = []
    if input_ids.device.type != "cuda":
        problems.append(f"input_ids on {input_ids.device} (CUDA graphs need CUDA)")
    if speculative is False:
        problems.append("speculative=False (the graphed loop is the speculative one)")
    cap = _capacity(cache)
    if cap is None:
        problems.append(f"past_key_values={type(cache).__name__} (expected a StaticCache: fixed shapes)")
    elif cap < input_ids.shape[1] + max_new_tokens + 1:
        problems.append(f"a StaticCache of {cap} positions (expected >= prompt + max_new_tokens + 1 = "
                        f"{input_ids.shape[1] + max_new_tokens + 1})")
    try:
        runtime = runtime_of(model)
        policy = runtime.policy
        if not policy.static:
            problems.append(f"policy {policy.name!r} without policy_options['static']=True")
        if runtime.config.measure_error:
            problems.append("measure_error=True (its exact attention reads the host: not capturable)")
    except ValueError:
        problems.append("a model not compiled with specache.compile")
    if problems:
        raise ValueError("specache.generate(cuda_graph=True): got " + "; ".join(problems) + ". Fix: "
                         "specache.compile(model, policy_options={'static': True}), a transformers StaticCache with "
                         "room for every token, on CUDA.")


def _fixed_buffer_steps(model, runtime, cache, kwargs, tok, spec, mask, p, n_steps, on_step, suppress, capture):
    """The speculative steps over fixed input buffers that the step itself advances on the device (tokens, cache
    positions, position ids, output column), so one step is one replayable unit. capture=False runs the same step
    eagerly (the CPU tests use it). Returns the new tokens [B, n_steps]."""
    b, dev = tok.shape[0], tok.device
    cap = _capacity(cache)
    ids = torch.cat([tok, spec], dim=1)  # [B, 2]: T_t, T'_{t+1}
    full_mask = torch.ones((b, cap), dtype=mask.dtype, device=dev)
    full_mask[:, : mask.shape[1]] = mask  # the prompt's padding; the causal mask hides the positions not yet written
    m2 = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
    pos_ids = _positions(m2)[:, -2:].contiguous()
    cache_pos = torch.arange(p, p + 2, device=dev)
    outs = torch.empty((b, n_steps), dtype=torch.long, device=dev)
    col = torch.zeros(1, dtype=torch.long, device=dev)
    sup: list = []  # the suppression row, made at the first (eager) step from the logits' width
    cache_kw = cache_keyword(model)

    def step():
        before = runtime.calls
        with runtime.stepping(SPECULATIVE):
            out = model(input_ids=ids, attention_mask=full_mask, position_ids=pos_ids, **{cache_kw: cache},
                        use_cache=True, cache_position=cache_pos, **kwargs)
        if runtime.calls == before:
            raise RuntimeError("specache.generate: the model ran without specache's compiled graph (see the "
                               "refusal in generate's call())")
        logits = out.logits[:, -2:].float()
        if suppress:
            if not sup:
                sup.append(torch.zeros(logits.shape[-1], device=dev).index_fill_(
                    0, torch.tensor(list(suppress), device=dev), float("-inf")))
            logits = logits + sup[0]
        nxt = logits.argmax(-1)  # [B, 2]: T_{t+1}, T'_{t+2}
        outs.index_copy_(1, col, nxt[:, :1])
        col.add_(1)
        ids.copy_(nxt)
        cache_pos.add_(1)
        pos_ids.add_(1)
        _drop_last(cache)  # the speculative token leaves the model's cache (a device counter on 5.2x StaticLayers)

    if not capture:
        for i in range(n_steps):
            step()
            if on_step is not None:
                on_step(i)
        return outs
    warm = min(2, n_steps)
    side = torch.cuda.Stream(dev)  # warm-up off the default stream, as CUDA graph capture wants
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for i in range(warm):
            step()
            if on_step is not None:
                on_step(i)
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)  # NOTE: once: no fetch of a warm-up step may still be in flight at the capture
    graphs: list = []
    pool = None
    i = warm
    while i < n_steps:
        if len(graphs) < 2:  # one graph per prefetch-slot parity; capturing runs the step's Python once
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                step()
                runtime.streams.join(dev)  # every prefetch of the step joins back before the capture ends
            pool = g.pool()
            graphs.append(g)
        graphs[(i - warm) % 2].replay()
        if on_step is not None:
            on_step(i)
        i += 1
    replays_without_python = max(0, n_steps - warm - len(graphs))
    for site in runtime.sites.values():
        if site.static is not None:
            site.static.replayed(site, replays_without_python)
    return outs
