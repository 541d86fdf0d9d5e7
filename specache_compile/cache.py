"""``cache_implementation="specache"``: the cache ``model.generate`` decodes into after ``specache.compile``.

A transformers ``StaticCache`` whose capacity is rounded up to a bucket (four buckets per power of two, at least
:data:`MIN_BUCKET` positions). Why a StaticCache: its writes go by position (``index_copy_``), which the pass turns
into index-mode sites whose state has the cache's fixed capacity, the shape the static decode path and a CUDA graph
need. Why buckets: every ``generate`` call with a new ``prompt + max_new_tokens`` would otherwise give the cache a new
capacity, hence new graph shapes and a recompile per call (transformers keeps the largest capacity seen, which still
recompiles at every new maximum); with buckets the shapes change only when a call outgrows its bucket. The price is
capacity the call does not use, in the store's host buffers and the static path's device state (both sized by the
capacity): a quarter of the length at most above 4K positions (power-of-two buckets cost up to as much again as the
length, the demo's 2K prompt 1.9x its host KV), for at most four recompiles per doubling of the length.

Not registered in transformers' tables of cache implementations (they are module constants its ``generate``
validates against): the compiled model's ``generate`` (api._generate_checked) builds this cache itself when asked for
``cache_implementation="specache"``, or by default for a policy that decodes through fixed-shape state, and passes it
as the call's cache.
"""

from __future__ import annotations

from typing import Any

import torch

MIN_BUCKET = 1024  # positions: below it a bucket's unused capacity costs less than a recompile


def bucket(n: int) -> int:
    """The capacity a cache needs for ``n`` positions: ``n`` rounded up to a multiple of an eighth of the next power
    of two (at least MIN_BUCKET): 3072 for 2115, 10240 for 8206, 163840 for 131086."""
    if n < 1:
        raise ValueError(f"specache cache: expected a positive number of positions, got {n}")
    step = max(MIN_BUCKET, (1 << (n - 1).bit_length()) // 8)
    return -(-n // step) * step


def make_cache(model: torch.nn.Module, positions: int):
    """A StaticCache for ``model`` with room for ``positions`` (prompt + new tokens + the one written past the last),
    its capacity rounded up to the bucket. Lazily initialised (batch, heads, device and dtype from the first write),
    so the compiled prefill allocates its buffers itself and the pass replaces them with the store."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=bucket(positions))


def _edits_cache(gen, kwargs: dict[str, Any]) -> bool:
    """The generation mode edits the cache between steps (beam search reorders it, assisted and prompt-lookup decoding
    crop it): the default DynamicCache, which the store follows, rather than a StaticCache it must refuse to reorder."""
    def get(name, default=None):
        return kwargs.get(name, getattr(gen, name, default))

    beams = get("num_beams", 1) or 1
    return beams > 1 or any(get(name) is not None for name in
                            ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"))


def generate_kwargs(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], static_policy: bool,
                    cache_key: str) -> dict[str, Any]:
    """``kwargs`` for the model class's generate with a specache cache put in, where the call asks for one
    (``cache_implementation="specache"``) or leaves the choice to the default of a policy that decodes through
    fixed-shape state (``static_policy``) in a mode that does not edit the cache (not beam search, assisted or
    prompt-lookup decoding). Untouched where the caller passed a cache, another cache implementation,
    ``use_cache=False``, an encoder-decoder model, or a call whose length cannot be read before it runs."""
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    impl = kwargs.get("cache_implementation", getattr(gen, "cache_implementation", None))
    if impl not in ("specache", None) or (impl is None and (not static_policy or _edits_cache(gen, kwargs))):
        return kwargs
    out = dict(kwargs)
    out.pop("cache_implementation", None)
    if getattr(gen, "cache_implementation", None) == "specache":
        # set in the generation config: transformers would reject a name it does not know, or a cache beside it
        out["cache_implementation"] = None
    given = [k for k in ("cache", "past_key_values") if kwargs.get(k) is not None]
    if given:
        if impl == "specache":
            raise ValueError(
                f"specache: expected either cache_implementation='specache' or a cache object, got both ({given[0]}=); "
                "fix: pass one of them"
            )
        return out
    cfg = getattr(model, "config", None)
    if kwargs.get("use_cache") is False or getattr(cfg, "is_encoder_decoder", False):
        return out
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return out
    prompt = ids.shape[1]
    new = kwargs.get("max_new_tokens", getattr(gen, "max_new_tokens", None) if "max_length" not in kwargs else None)
    if new is None:
        max_length = kwargs.get("max_length", getattr(gen, "max_length", None))
        if max_length is None:
            return out
        new = max_length - prompt
    cache = make_cache(model, prompt + max(int(new), 0) + 1)
    if impl is None and any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        # a sliding-window layer of a StaticCache rolls its buffer in place (copy_), which the pass cannot follow:
        # such a site would keep its original attention, its full KV on the device. The default DynamicCache's
        # sliding layers are rewritten (window mode), so by default those models keep it
        return out
    out[cache_key] = cache
    return out
