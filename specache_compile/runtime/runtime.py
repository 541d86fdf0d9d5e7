"""The runtime behind ``specache::attend``: one per compiled model, holding every site's store and the policy.

The pass replaces each attention with one call of ``specache::attend`` that names its site; the op lands here.
Here the new tokens are written to the site's store, the attended range of store positions is worked out from how
the model's own cache would have laid it out, and the policy computes the attention (exactly, for multi-query calls).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import weakref
from dataclasses import asdict
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..config import Config, KVHome
from ..kernels import ops
from ..layout import Layout
from ..policies import PrefillView, registered
from .store import Site
from .streams import Streams

log = logging.getLogger("specache")

# How the model's cache lays out the keys the original attention read (set by the pass, see passes/kv_source.py).
APPEND, INDEX, WINDOW = Layout.APPEND, Layout.INDEX, Layout.WINDOW
_BUFFER_IS_TOKEN = -1  # Site.buffer_ptr: the index-mode buffer is the placeholder of the token handed out next
_RETIRED_KEPT = 8  # earlier cache tokens kept alive per site: their storage cannot be reused by a later token

# Step modes (Runtime.stepping): how the runtime reads the next calls. See specache_compile/generate.py.
NORMAL, LOOKAHEAD, SPECULATIVE = "normal", "lookahead", "speculative"


class CacheMismatch(RuntimeError):
    pass


_ids = itertools.count(1)
_RUNTIMES: weakref.WeakValueDictionary[int, Runtime] = weakref.WeakValueDictionary()
# keyed by tensor identity: a WeakKeyDictionary would compare tensors with == (elementwise) on lookup
_BY_PARAM: WeakIdKeyDictionary = WeakIdKeyDictionary()
_lock = threading.Lock()


def get(handle: int) -> Runtime:
    rt = _RUNTIMES.get(handle)
    if rt is None:
        raise RuntimeError(
            f"specache: runtime {handle} no longer exists (its model was garbage-collected); recompile the model"
        )
    return rt


def for_params(params: list[torch.Tensor], config: Config) -> Runtime:
    """The runtime that owns these parameters (``torch.compile(m, backend="specache")`` compiles each graph of a model
    separately, and all of them must share one store), created on first sight."""
    with _lock:
        for p in params:
            rt = _BY_PARAM.get(p)
            if rt is not None:
                if rt.config != config:
                    raise ValueError(
                        "specache: this model was already compiled with another specache config; expected the same "
                        f"options for every graph, got {config} after {rt.config}. Fix: torch._dynamo.reset() first."
                    )
                break
        else:
            rt = Runtime(config)
        rt.adopt(params)
        return rt


def by_params(params) -> Runtime | None:
    for p in params:
        rt = _BY_PARAM.get(p)
        if rt is not None:
            return rt
    return None


class Runtime:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.policy = registered()[config.policy].from_config(config)
        self.sites: dict[str, Site] = {}
        self.handle = next(_ids)
        self.graph_stats: dict[str, list] = {}  # site -> the pass's SiteReport for each graph the site appeared in
        # id(parameter) -> the path of the attention module it belongs to (specache.compile, api.attention_module):
        # names the site of an attention traced without Dynamo's module stack (a frame resumed after a graph break in
        # the attention's forward); _owner_names: the same by storage address, and the names given so far
        self.param_modules: dict[int, str] = {}
        self._owner_names: dict[int, str] = {}
        self.streams = Streams()
        self.capacity_hint = 0  # tokens the next sequence will reach (specache.generate sets it): one allocation
        self.calls = 0  # attend calls served: specache.generate checks every model call reached the runtime
        # attend calls that were a plain one-token static decode step: decode_graphs proves a call capturable by it
        self.plain_static_steps = 0
        self.step_mode = NORMAL
        self._serial = 0  # sequences started: a token's storage size carries it (Runtime.token)
        self._pos_bad: torch.Tensor | None = None
        self._pos_site: tuple[str, int] = ("", 0)
        from ..policies.specache_static import StepShared

        self._step_shared = StepShared()  # the static path's per-step values every layer shares
        _RUNTIMES[self.handle] = self

    def adopt(self, params: list[torch.Tensor]) -> None:
        for p in params:
            _BY_PARAM[p] = self

    # -- the op ---------------------------------------------------------------------------------------------------
    def attend(
        self,
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
        site_name: str,
    ) -> torch.Tensor:
        # q: [B, Hq, Sq, D]; k_new, v_new: [B, Hkv, Sn, D] the tokens this call adds; mask: [.., Sq, ncols] or None
        sq, sn = q.shape[2], k_new.shape[2]
        self.calls += 1
        site = self.sites.get(site_name)
        speculating = self.step_mode != NORMAL
        n_real = sn  # tokens this call appends to the store (a speculative row is attended, never stored)
        if speculating:
            want = 1 if self.step_mode == LOOKAHEAD else 2
            if sq != want or sn != want or site is None or site.length == 0:
                raise CacheMismatch(
                    f"specache: site {site_name}: a {self.step_mode} step expects {want} new token(s) after a prefill, "
                    f"got {sn} (queries {sq}) with {0 if site is None else site.length} stored. Fix: drive speculative "
                    "decoding through specache.generate."
                )
            if not self.policy.speculative:
                raise CacheMismatch(f"specache: policy {self.policy.name!r} does not decode speculatively; "
                                    "fix: use specache.generate with speculative=False")
            n_real = want - 1
        elif sq > 1:
            self.check_deferred()
        ncols_read = len(range(*slice(col_start, col_stop).indices(base_len)))
        if mask is not None and mask.shape[-1] == 1 and ncols_read != 1:
            # a mask broadcast along the keys ([B, 1, 1, 1]): the policies read the bias width as the attended columns
            mask = mask.expand(*mask.shape[:-1], ncols_read)
        if mode != INDEX:
            past = base_len - sn
            if past == 0 or site is None:
                if past != 0:
                    raise CacheMismatch(
                        f"specache: site {site_name} got a cache of {past} past tokens that specache never stored; "
                        "expected a cache filled by this compiled model, got one from elsewhere"
                        f"{self._skipped_note(site_name)}. Fix: pass a fresh cache (or none) to the compiled model."
                    )
                site = self._reset(site_name, site, k_new, v_new)
            else:
                self.follow_cache(site, cache, past, mode)
            # (no cache tensor: a direct caller that lays out its own window, as the policies' tests do)
            if past > site.length or (mode == APPEND and cache is not None and past != site.length):
                raise CacheMismatch(
                    f"specache: site {site_name} was given {past} past tokens but its store holds {site.length}; "
                    "expected the cache this compiled model returned last. Fix: pass that cache, or a fresh one."
                )
            if self.policy.static_required and (sq == 1 or speculating):
                raise CacheMismatch(
                    f"specache: site {site_name}: policy_options['static'] decodes index-mode caches only (positions "
                    "on the device, shapes fixed by the cache's capacity); this model's cache appends with "
                    "torch.cat (DynamicCache). Fix: decode with a StaticCache (past_key_values=StaticCache(...)), or "
                    "without static=True."
                )
            start = site.length
            first = start + sn - base_len  # store position of base column 0 (> 0 for a sliding-window layer)
        elif (sq == 1 or speculating) and site is not None and site.length > 0:
            self._check_buffer(site, cache)
            if write_pos.device.type == "cpu" and not speculating:
                # positions on the host cost no sync: follow a rewind (a draft model re-decoding) now, not later
                self._follow_start(site, self._read_positions(site_name, write_pos, sn))
            if self.policy.static:
                return self._attend_static(site, q, k_new, v_new, mask, write_pos, base_len, col_start, col_stop,
                                           scale, n_real, speculating)
            # A decode step continues the sequence at the store's length: no host read of the positions (it would
            # sync once per layer per step). The check runs on the device; check_deferred() raises at the next
            # prefill, specache.stats() or the end of specache.generate.
            start, first = site.length, 0
            self._defer_position_check(site_name, write_pos, start, sn)
        else:
            # NOTE: reading the write positions to the host syncs with the device: prefill only.
            start = self._read_positions(site_name, write_pos, sn)
            if start == 0 or site is None:
                if start != 0:
                    raise CacheMismatch(
                        f"specache: site {site_name} writes at position {start} but its store is empty; expected a "
                        "cache filled by this compiled model from position 0. Fix: prefill through the compiled model."
                    )
                site = self._reset(site_name, site, k_new, v_new)
            else:
                self._check_buffer(site, cache)
                self._follow_start(site, start)
            if start == 0:
                # a buffer the prefill graph allocated itself (a lazily initialised StaticCache layer) is the
                # placeholder expanded from the token this call hands out: token() records its address
                site.buffer_ptr = cache.data_ptr() if cache is not None else _BUFFER_IS_TOKEN
            first = 0
        if site is not None and site.static is not None and site.length > 0 and not (mode == INDEX and (sq == 1 or
                                                                                                  speculating)):
            # a multi-token call after static decode steps (a chunk more of prompt, assisted decoding's check of its
            # drafts): the policy's state goes back to the default path's, rebuilt from the full-precision rows; the
            # next one-token step builds the fixed-shape state again (a host round trip: rare, never a plain step)
            self.rewrite_history(site, site.length, None, f"continued with a {sq}-token call")
        if not site.matches(k_new, v_new):
            raise CacheMismatch(
                f"specache: site {site_name} was prefilled with batch {site.batch}, {site.heads} KV heads, "
                f"{site.dtype} on {site.device}; got {tuple(k_new.shape)} {k_new.dtype} on {k_new.device} without a "
                "new prefill. Fix: start a new sequence (empty cache) when the batch changes."
            )
        if n_real:
            k_in, v_in = (k_new, v_new) if n_real == sn else (k_new[:, :, :n_real], v_new[:, :, :n_real])
            site.write(start, k_in, v_in)
            self.policy.append(site, k_in, v_in, start)

        # Base columns [lo, hi) of what the original attention read, then store positions [p_lo, p_hi).
        lo, hi, step = slice(col_start, col_stop).indices(base_len)
        if step != 1:
            raise CacheMismatch(f"specache: site {site_name}: strided KV slice (step {step}) reached the runtime")
        ncols = max(0, hi - lo)
        p_lo, p_hi = first + lo, first + lo + ncols
        if speculating:
            # The speculative token sits at store position site.length (never written): one column past the store.
            bias = ops.attention_bias(mask, is_causal, sq, ncols, q.device)
            valid = min(p_hi, site.length + 1)
            if valid != site.length + 1:
                raise CacheMismatch(f"specache: site {site_name}: a speculative step must attend to its own token "
                                    f"(position {site.length}); the model's attention stops at {valid}")
            if bias is not None and valid < p_hi:
                bias = bias[..., : valid - p_lo]
            site.stats.decode_steps += n_real
            out = self.policy.decode_speculative(site, q, k_new[:, :, -1:], v_new[:, :, -1:], bias, p_lo,
                                                 site.length, scale)
            if self.config.measure_error and n_real:  # the real rows, over the stored tokens (not the speculative)
                b_real = None if bias is None else bias[..., :n_real, :-1]
                self._measure(site, q[:, :, :n_real], b_real, p_lo, site.length, scale, out[:, :, :n_real])
            return out
        if sq > 1:
            self._step_shared.clear()  # a prefill call: whatever the static path shared belongs to an earlier step
            # Multi-query calls (prefill, chunked prefill) are exact attention for every policy, through SDPA itself:
            # flash/memory-efficient kernels on CUDA, and the very kernel the original graph called.
            site.stats.prefill_tokens += sn
            p_hi = min(p_hi, site.length)  # INDEX mode: columns past the written length are never read
            if (p_lo, p_hi) == (start, start + sn):  # the attended tokens are exactly the new ones: no round trip
                k, v = k_new, v_new
            elif not site.keep_full and site.codec is None:
                raise CacheMismatch(
                    f"specache: site {site_name}: policy {self.policy.name!r} keeps no full-precision KV, so a "
                    f"multi-token call over earlier tokens (positions [{p_lo}, {p_hi}), new [{start}, {start + sn})) "
                    "cannot be exact. Fix: prefill the prompt in one call, or use policy 'specache' or 'full'."
                )
            else:
                k, v = site.fetch_range(p_lo, p_hi)
            if mask is not None and k.shape[2] < ncols:
                mask = mask[..., : k.shape[2]]
            # contiguous: SDPA's output strides follow q's (often a transposed view); the op's fake promises dense
            out = ops.exact_attention(q, k, v, mask, is_causal, scale).contiguous()
            self.policy.prefill(site, PrefillView(q, k, v, mask, is_causal, p_lo, p_lo + k.shape[2], start, scale))
            return out
        bias = ops.attention_bias(mask, is_causal, sq, ncols, q.device)
        valid = max(p_lo, min(p_hi, site.length))  # INDEX mode: columns past the written length are never read
        if bias is not None and valid < p_hi:
            bias = bias[..., : valid - p_lo]
        p_hi = valid
        site.stats.decode_steps += 1
        out = self.policy.decode(site, q, bias, p_lo, p_hi, scale)
        if self.config.measure_error:
            self._measure(site, q, bias, p_lo, p_hi, scale, out)
        return out

    def _attend_static(self, site, q, k_new, v_new, mask, write_pos, base_len, col_start, col_stop, scale, n_real,
                       speculating):
        """A decode step through the policy's static path (policies/specache_static.py): every shape is fixed by the
        cache's capacity (base_len) and the positions stay on the device. Host-side counters advance here; a CUDA
        graph replay of the step would not run this code (the counters are reporting only)."""
        lo, hi, step = slice(col_start, col_stop).indices(base_len)
        if (lo, hi, step) != (0, base_len, 1):
            raise CacheMismatch(
                f"specache: site {site.name}: the static decode path attends the whole cache; this attention reads "
                f"columns [{lo}, {hi}) of {base_len}. Fix: decode without policy_options['static'] for this model."
            )
        if self.policy.uses_store and (not site.keep_full or site.codec is not None):
            raise CacheMismatch(f"specache: site {site.name}: the static decode path needs the full-precision store")
        if site.length >= base_len:
            raise CacheMismatch(f"specache: site {site.name}: the cache holds {base_len} positions, all written; "
                                "fix: a StaticCache with a larger max_cache_len")
        sq = q.shape[2]
        pos = write_pos.reshape(-1)
        shared = self._step_shared
        shared.begin(site.name)  # a site seen twice starts a new step: the values of the last one are dropped
        site.step_shared = shared

        def make_bias():
            if mask is not None:
                return ops.attention_bias(mask, False, sq, base_len, q.device)
            # causal over store positions: row i attends positions <= its own
            cols = torch.arange(base_len, device=q.device)
            return torch.where(cols <= pos[:, None], 0.0, float("-inf")).reshape(1, 1, sq, base_len)

        # every layer of a step builds the same bias from the same mask (or positions): the first one does
        # (the mask is kept with it: its id cannot be reused by another tensor while the step's values live)
        bias = shared.get(("bias", id(mask), sq, base_len, q.device), lambda: (mask, make_bias()))[1]
        out = self.policy.decode_static(site, q, k_new, v_new, pos, bias, scale, n_real, speculating)
        site.count_static_steps(n_real, speculating)
        if not speculating and sq == 1:
            self.plain_static_steps += 1
        if self.config.measure_error and n_real:
            # the real rows against exact attention over the stored tokens (host counters: an eager step only; a
            # CUDA graph replay runs no Python, and generate refuses cuda_graph with measure_error)
            n = site.length
            self._measure(site, q[:, :, :n_real], bias[..., :n_real, :n], 0, n, scale, out[:, :, :n_real])
        self._pos_bad = site.static.bad  # persistent: check_deferred reads and clears it
        self._pos_site = (site.name, site.length)
        return out

    def owner_site(self, owner: torch.Tensor, traced: str) -> str:
        """The site of an attention whose graph is shared by every layer (traced in a resumed frame): named from the
        parameter ``owner`` of its module, found by storage (the op may be handed another tensor object over the same
        parameter) among this runtime's parameters, else by address. The report of the traced graph is filed under
        that name too."""
        ptr = owner.data_ptr()
        name = self._owner_names.get(ptr)
        if name is None:
            name = next((self.param_modules[id(p)] for p, rt in _BY_PARAM.items()
                         if rt is self and id(p) in self.param_modules and p.data_ptr() == ptr), None)
            if name is None:
                # no names (torch.compile path): the first owner is the one the graph was traced with
                name = traced if traced not in self._owner_names.values() else f"{traced}@{ptr:x}"
            self._owner_names[ptr] = name
        if name != traced and traced in self.graph_stats and name not in self.graph_stats:
            self.graph_stats[name] = list(self.graph_stats[traced])
        return name

    # -- following the model's cache ------------------------------------------------------------------------------
    def token(self, site_name: str) -> torch.Tensor:
        """A new cache token for the site: [B, 1, 1, 1] row ids 0..B-1 in the KV dtype, which the pass expands into
        the placeholders the model's cache keeps. Fresh storage each call (an op's output may not alias its inputs,
        and the last call's token comes back as the cache input), sized to carry the sequence's serial, so the
        runtime tells apart the cache it handed out last (a crop keeps its storage), an earlier one, an unknown copy
        (copy.deepcopy copies the whole storage) and a gather of rows (beam search's reorder_cache materialises the
        row ids it picked)."""
        site = self.sites[site_name]
        size = site.batch + 1 + site.serial % 61
        if site.master is None or site.master.shape[0] != size:
            buf = torch.zeros(size, dtype=site.dtype, device=site.device)
            buf[: site.batch].copy_(torch.arange(site.batch))
            site.master = buf
        site.token = site.master.clone()[: site.batch].view(site.batch, 1, 1, 1)
        if site.buffer_ptr == _BUFFER_IS_TOKEN:
            site.buffer_ptr = site.token.data_ptr()
        return site.token

    def _retire(self, site: Site, valid: int) -> None:
        site.retired = [(t, min(n, valid)) for t, n in site.retired]
        if site.token is not None:
            site.retired.append((site.token, valid))
        site.retired = site.retired[-_RETIRED_KEPT:]
        site.token = None

    def follow_cache(self, site: Site, cache: torch.Tensor | None, past: int, mode: int) -> None:
        """Make the store follow what was done to the model's cache outside the graph since the last call, or raise.

        DynamicCache's crop (assisted and prompt-lookup decoding) keeps the placeholder's storage at a shorter length;
        reorder_cache (beam search), batch_repeat_interleave and batch_select_indices gather the token's row ids into
        a new tensor; copy.deepcopy (prefix reuse) copies the storage. Each is recognised from the tensor the cache
        hands back (no host sync on a plain step: storage pointer and strides are metadata), and the store is cut
        back or its rows gathered to match, with the policy's device tier rebuilt from the full-precision rows."""
        if cache is None:
            return
        ptr = cache.data_ptr()
        if site.token is not None and ptr == site.token.data_ptr():
            if mode == APPEND and past < site.length:
                self.rewrite_history(site, past, None, f"cropped to {past} tokens")
            return
        what = "handed back a cache specache did not produce last"
        for tok, valid in site.retired:
            if ptr == tok.data_ptr():
                if mode == APPEND and past <= min(valid, site.length):
                    self.rewrite_history(site, past, None, f"resumed from an earlier cache at {past} tokens")
                    return
                what = (f"resumed from a cache of {past} tokens that was cropped, reordered or continued elsewhere "
                        f"since (the store still matches its first {min(valid, site.length)})")
                break
        else:
            if mode == WINDOW:
                what = "copied, reordered or cropped a sliding-window layer's cache, which specache cannot follow"
            elif all(st == 0 for st in cache.stride()[1:]) and site.master is not None and (
                    cache.untyped_storage().nbytes() == site.master.untyped_storage().nbytes()):
                # a copy of a placeholder of this sequence (copy.deepcopy of the cache): what it holds is the prefix
                # the store has not been cut below since the sequence began
                if past <= min(site.low_water, site.length):
                    if past < site.length:
                        self.rewrite_history(site, past, None, f"continued from a copy at {past} tokens")
                    return
                what = f"continued from a copy of {past} tokens while the store was cut below that since"
            elif past == site.length and cache.dim() == 4 and any(st != 0 for st in cache.stride()[1:]):
                # NOTE: reads the row ids to the host (a sync): only after beam search's reorder, never on a plain step
                ids = cache[:, 0, 0, 0].float().cpu()
                rows = ids.round().long()
                if bool((ids == rows).all()) and bool(((rows >= 0) & (rows < site.batch)).all()):
                    self.rewrite_history(site, past, rows, "reordered (beam search)")
                    return
        raise CacheMismatch(
            f"specache: site {site.name}: the model's cache was {what}; expected the cache this compiled model "
            "returned (or a crop, reorder or copy of it). Fix: pass the cache the last call returned, or start a new "
            "sequence with a fresh cache."
        )

    def rewrite_history(self, site: Site, n: int, rows: torch.Tensor | None, why: str) -> None:
        """Cut the store back to ``n`` tokens (and keep batch ``rows``), then rebuild the policy's device tier from
        the full-precision rows. Caches of earlier tokens keep only the prefix they still share."""
        name = self.policy.name
        if not (self.policy.uses_store and site.keep_full and site.codec is None):
            raise CacheMismatch(
                f"specache: site {site.name}: the model's cache was {why} outside the compiled graph; policy {name!r} "
                "keeps no full-precision copy to rebuild its state from. Fix: use policy 'specache' or 'full' for "
                "beam search, assisted decoding and cache copies, or a generation mode that does not edit the cache."
            )
        if site.static is not None:
            # the fixed-shape state is rebuilt at the next static step from the default path's state rebuilt here;
            # NOTE: a host sync (the store's rows the GPU wrote must have landed before they are read back)
            if site.device.type == "cuda":
                torch.cuda.synchronize(site.device)
        site.truncate(n)
        if rows is not None:
            site.select_batch(rows)
        self._retire(site, 0 if rows is not None else n)
        site.low_water = 0 if rows is not None else min(site.low_water, n)
        self._step_shared.forget_values()
        self.policy.reset(site)
        if n:
            self.policy.append(site, site.k.read(0, n, site.device), site.v.read(0, n, site.device), 0)
        site.stats.rewrites += 1

    def _check_buffer(self, site: Site, cache: torch.Tensor | None) -> None:
        """An index-mode cache writes in place into one buffer for the whole sequence; another buffer means the cache
        was copied or reordered (reorder_cache gathers a new one), which the store cannot follow."""
        if cache is not None and site.buffer_ptr > 0 and cache.data_ptr() != site.buffer_ptr:
            fix = ("compile without policy_options['static'] and use a DynamicCache" if self.policy.static
                   else "use a DynamicCache (pass cache_implementation='dynamic' to model.generate)")
            raise CacheMismatch(
                f"specache: site {site.name}: the model's StaticCache buffers were replaced since its prefill (a beam "
                "search reorder_cache or a copy of the cache); specache cannot follow a static cache's reorder or "
                f"copy. Fix: {fix} for beam search and cache copies."
            )

    @staticmethod
    def _read_positions(site_name: str, write_pos: torch.Tensor, n: int) -> int:
        """The first of the ``n`` consecutive positions an index-mode cache writes (read on the host)."""
        pos = write_pos.reshape(-1).to("cpu")
        start = int(pos[0])
        if pos.numel() != n or not torch.equal(pos, torch.arange(start, start + n)):
            raise CacheMismatch(
                f"specache: site {site_name} writes positions {pos.tolist()[:8]}...; expected {n} consecutive "
                "positions. Fix: write the cache in order (cache_position = arange(past, past + n))."
            )
        return start

    def _follow_start(self, site: Site, start: int) -> None:
        """An index-mode write at ``start``: the next position, or earlier (a crop or a rewind: followed)."""
        if start < site.length:
            self.rewrite_history(site, start, None, f"rewound to position {start}")
        elif start > site.length:
            raise CacheMismatch(
                f"specache: site {site.name} writes at position {start} but its store holds {site.length} "
                "tokens; expected at most the next position. Fix: write the cache in order from position 0."
            )

    # -- speculative decoding and deferred checks -----------------------------------------------------------------
    @contextlib.contextmanager
    def stepping(self, mode: str):
        """Run the model's next call(s) as ``mode``: "lookahead" (SpeCache Algorithm 2: one token attended, not
        stored) or "speculative" (Algorithm 3: [real, speculative] tokens, only the real one stored)."""
        if mode not in (NORMAL, LOOKAHEAD, SPECULATIVE):
            raise ValueError(f"specache: step mode expected one of {NORMAL!r}, {LOOKAHEAD!r}, {SPECULATIVE!r}, "
                             f"got {mode!r}")
        prev, self.step_mode = self.step_mode, mode
        try:
            yield
        finally:
            self.step_mode = prev

    def _defer_position_check(self, site_name: str, write_pos: torch.Tensor, start: int, n: int) -> None:
        want = torch.arange(start, start + n, device=write_pos.device)
        bad = (write_pos.reshape(-1)[:n] != want).any() | (write_pos.numel() != n)
        if self._pos_bad is None:
            self._pos_bad, self._pos_site = bad, (site_name, start)
        else:
            self._pos_bad = self._pos_bad | bad

    def check_deferred(self) -> None:
        """Raise if a decode step wrote its cache somewhere else than the next position (checked on the device)."""
        # the static path's flags are persistent device tensors its steps raise, replayed graph steps included (which
        # run no Python, so they leave no deferred check of their own): folded in every time, on the device (one host
        # read for all), then cleared
        flagged = [(name, site.static.bad) for name, site in self.sites.items() if site.static is not None]
        if self._pos_bad is None and not flagged:
            return
        if self._pos_bad is None:
            bad, name, start = flagged[0][1], flagged[0][0], "the last check"
        else:
            bad, (name, start) = self._pos_bad, self._pos_site
        self._pos_bad = None
        for _, flag in flagged:
            bad = bad | flag
        failed = bool(bad)
        for _, flag in flagged:
            flag.zero_()
        if failed:
            raise CacheMismatch(
                f"specache: a decode step since position {start} (first at site {name}) wrote its cache at other "
                "positions than the next one; the tokens it produced attended to the wrong history. Fix: write the "
                "cache in order (cache_position = arange(past, past + n)) and re-prefill."
            )

    def _skipped_note(self, site_name: str) -> str:
        skipped = [r.reason for r in self.graph_stats.get(site_name, []) if r.status == "skipped"]
        if not skipped:
            return ""
        return (f" (in another graph this attention was left alone, so the tokens it saw were never stored: "
                f"{skipped[0]})")

    def _reset(self, name: str, site: Site | None, k_new: torch.Tensor, v_new: torch.Tensor) -> Site:
        if site is None or not site.matches(k_new, v_new):
            home_host = self.config.kv_home == KVHome.HOST
            host_device = torch.device("cpu") if home_host else k_new.device
            site = Site(
                name=name,
                batch=k_new.shape[0],
                heads=k_new.shape[1],
                head_dim=k_new.shape[3],
                v_head_dim=v_new.shape[3],
                dtype=k_new.dtype,
                device=k_new.device,
                host_device=host_device,
                # pinned host memory only where a device will copy from it
                pin=home_host and k_new.device.type == "cuda",
                home=self.config.kv_home.value,
                capacity=max(self.config.max_seq_len or 0, self.capacity_hint),
                keep_full=(self.policy.uses_store and self.policy.host_codec is None)
                or self.config.measure_error,
                streams=self.streams,
            )
            self.sites[name] = site
        site.truncate(0)
        self._serial += 1
        site.serial = self._serial
        self._retire(site, 0)  # caches of the last sequence share nothing with this one
        site.master = None
        site.low_water = 1 << 62
        site.buffer_ptr = 0
        self._step_shared.clear()
        site.capacity = max(site.capacity, self.capacity_hint)
        if self.policy.host_codec is not None:
            # a fresh compressed host store per sequence, in the site's host memory (pinned where a GPU reads it)
            site.codec = self.policy.new_host_codec(site.host_device, site.pin, site.capacity)
        if self.capacity_hint and site.keep_full:
            site.k.reserve(self.capacity_hint)
            site.v.reserve(self.capacity_hint)
        site.stats = type(site.stats)()
        self.policy.reset(site)
        return site

    def _measure(self, site, q, bias, lo, hi, scale, out) -> None:
        k, v = site.k.read(lo, hi, site.device), site.v.read(lo, hi, site.device)
        exact = ops.sparse_attention(q, k, v, bias, scale).float()
        err = ((out.float() - exact).norm() / exact.norm().clamp_min(1e-30)).item()
        st = site.stats
        st.err_sum += err
        st.err_max = max(st.err_max, err)
        st.err_count += 1

    # -- reporting ------------------------------------------------------------------------------------------------
    def tier_bytes(self) -> dict[str, int]:
        out = {"host": 0, "device": 0}
        for s in self.sites.values():
            for k, v in s.tier_bytes().items():
                out[k] += v
        return out

    def site_stats(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"length": s.length, **asdict(s.stats), **s.tier_bytes(), **self.policy.site_report(s)}
            for name, s in self.sites.items()
        }
