"""CAKE: cascading and adaptive KV-cache eviction with layer preferences.

Paper: Qin, Cao, Lin, Hu, Fan, Cheng, Lin, Li, "CAKE: Cascading and Adaptive KV cache Eviction with Layer
Preferences", ICLR 2025, arXiv 2503.12491; official code antgroup/cakekv @ c4675ce (``cake/cake_cache.py``,
``cake/utils.py``, ``cake/model/modify_llama.py``), read for every detail below (digest: ../shared/research/papers.md
§4). The paper body was not readable here: where it and the code could differ, the code is followed.

Prefill of layer l (prompt of S tokens, observation window of the last S_w queries, A = their attention):

    A     = softmax(scale · Q[-S_w:] Kᵀ + mask + causal-in-window)             [B, Hq, S_w, S]
    H_l   = −Σ_{b,h,i,j<S−S_w} A·log(A + 1e-10)                               spatial dispersion (a raw sum)
    V_l   = Σ_{b,h,j<S−S_w} Var_i A[b,h,i,j]                                  temporal shift (unbiased variance)
    P_l   = H_l^(1/τ1) · V_l^(1/τ2)                                            layer preference
    I_l   = avgpool_5( Mean_i A[:, :, i, j] + γ · Var_i A[:, :, i, j] ),  j < S − S_w, then the GQA-group mean
    B_l   = P_l / Σ_k P_k · B_total,  B_total = (C − S_w) · L,  clamped to the S − S_w evictable tokens
    keep  = TopK_j(I_l, B_l) per KV head  ⊕  the S_w window tokens

Cascading (Prop. 1 / Thm. 1): after layer m, the budgets B_l^(m) over layers 0..m (same B_total) are recomputed and
every processed layer is evicted down to its budget using its stored indicator, gathered along with its rows. Budgets
only shrink as layers are added (Prop. 1), and the top-k of a top-k is the top-k (same total order), so the kept sets
equal one-shot eviction with the final budgets (Thm. 1) while the device holds about B_total + one layer's prompt.

Decode (the code's ``CakeDecodingKVCache_LayerWise``; the paper's text on it was not readable here): each step
attends over every kept row plus the new token, then, once a layer holds more than B_l + S_w rows, scores its rows by
the new query's softmax, drops the S_w most recent, avg-pools (kernel 5), averages the GQA group, and keeps the top
B_l plus the S_w most recent: one token leaves per step. No variance term at decode.

Hyperparameters (``Config.policy_options``): ``budget`` C (default 1024, the code's ``--cache_size``): the average
tokens kept per layer per KV head, window included; or a float in (0, 1]: C = ceil(budget · S). ``window`` S_w
(32), ``gamma`` γ (200.0), ``tau1``/``tau2`` (1.0, 1.0: the code's fallback when its per-model table
``model2tau.json`` has no entry; the paper tunes them per model and budget), ``kernel`` (5, the pooling width),
``decode_evict`` (True: the code's decode rule; False keeps every generated token, as SnapKV/PyramidKV do),
``static`` ("auto": decode a StaticCache through fixed-shape rows, policies/cake_static.py; True: require that path;
False: never).

Choices made where the paper and code are silent or do not fit this runtime:

- Budget allocation (``allocate_budgets``) is proportional with caps, by the Sainte-Laguë divisor method: seats go
  one by one to the largest P_l / (s_l + 0.5) among layers below their cap. It rounds to the nearest proportional
  share, sums exactly to min(B_total, Σ caps), and gives capped layers' excess to the others in proportion to P (the
  code's ``adjust_budgets`` truncates, spreads the excess evenly, and can break Prop. 1 by a token). Divisor methods
  never take a seat from a layer when a layer is added, so Prop. 1 and Thm. 1 hold exactly in integers. Layers with
  P_l = 0 get tokens only once every other layer is capped, then evenly.
- No compression when the prompt fits: Σ_l (S − S_w) <= B_total, i.e. S <= C (the code's test is S <= C + S_w, and
  its decode rule then trims the cache to C at the first step; here prefill and decode agree). Each layer may then
  grow to max(C − S_w, S − S_w) + S_w rows during decode before the decode rule starts.
- L, the number of attention sites per forward, is not told to a policy. The first sequence after compiling evicts
  one-shot at its first decode step (Thm. 1: the same kept sets); it teaches L, and later sequences cascade. (A
  runtime hook giving the site count before the first prefill would cascade from the first sequence.)
- Window attention and every statistic run in float32 (the code rounds A to the model dtype); masked (padding) keys
  get probability 0 and fully masked query rows (padding queries of a short left-padded row) contribute zeros. The
  causal triangle inside the window is always added, as the code does. A prompt shorter than S_w has no evictable
  tokens. P_l sums over the batch, so a batch shares one budget per layer; each KV head keeps its own token set.
- Rows stay in ascending position order (top-k indices are sorted), with each row's store position kept next to it:
  the decode bias is gathered at those positions, and rows that slid out of a sliding-window layer's range (store
  positions below ``lo``) are masked. The code keeps rows in score order, so its decode pooling pools score-ranked
  neighbours; here it pools position-ordered kept neighbours.
- Ties in the indicator keep the lower position (``ops.topk_positions``' rule), on every device.

Host syncs: one per layer at prefill (P_l to the host for the allocation). Decode reads no device value on the host:
row counts are host integers, and the eviction is a device top-k and gather.

Static decode path (``static``, policies/cake_static.py): where the cache writes by position (a StaticCache, as
``model.generate`` gets after specache.compile, or a gpt-fast-style module), each site's rows get a fixed number of
slots at its first decode step (B_l + S_w + 1 with ``decode_evict``), the row count is a device counter, and the
decode rule is computed on those fixed shapes and applied by a device condition: the same rows and tokens as the
default path, with no host sync and no shape that changes, so decode_graphs.py replays the steps as CUDA graphs.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import ops
from ..runtime.state import parse_static
from .base import Policy, register_policy

log = logging.getLogger("specache")

_EPS = 1e-10  # inside the entropy's log, as the code's calculate_entropy


# -- pure functions (also for reuse: CAKE's per-layer budgets as another policy's per-layer top-k) ------------------


def _safe_softmax(logits: torch.Tensor) -> torch.Tensor:
    # A fully masked row (max = -inf) gives zeros, not NaN: no key attended, nothing contributed.
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def window_attention(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None, window: int
) -> torch.Tensor:
    """Attention probabilities of the last ``window`` queries over every key, float32: [B, Hq, Sw, N].

    q: [B, Hq, Sq, D]; k: [B, Hkv, N, D] (GQA: query head h reads KV head h // (Hq // Hkv)); bias: additive float
    mask of those rows, broadcastable to [B, Hq, Sw, N] (``PrefillView.bias(Sw)``) or None. Sw = min(window, Sq, N).
    The causal triangle over the last Sw columns is always added (the code does), fully masked rows are zeros.
    """
    sw = min(window, q.shape[2], k.shape[2])
    logits = ops.attention_logits(q[:, :, q.shape[2] - sw :], k, scale)  # [B, Hq, Sw, N] float32
    if bias is not None:
        logits = logits + (bias[..., bias.shape[-2] - sw :, :] if bias.shape[-2] > sw else bias)
    r = torch.arange(sw, device=q.device)
    future = r.unsqueeze(0) > r.unsqueeze(1)  # [Sw, Sw]: row i must not see window column j > i
    n = k.shape[2]
    logits[..., n - sw :] = logits[..., n - sw :].masked_fill(future, float("-inf"))
    return _safe_softmax(logits)


def layer_preference(probs_window: torch.Tensor, tau1: float = 1.0, tau2: float = 1.0) -> torch.Tensor:
    """CAKE's layer preference P = H^(1/τ1) · V^(1/τ2) as a 0-dim float64 tensor (on the input's device).

    probs_window: [B, Hq, Sw, S] window-attention probabilities (``window_attention``). Only the S − Sw prefix
    columns count: H = −Σ A log(A + 1e-10) summed over batch, heads, window rows and prefix columns (spatial
    dispersion), V = Σ over batch, heads and prefix columns of the unbiased variance over the window rows (temporal
    shift). A single sharp, steady peak gives P ≈ 0; broad attention that moves between queries gives a large P.
    """
    if not (tau1 > 0 and tau2 > 0):
        raise ValueError(f"layer_preference: expected tau1, tau2 > 0, got {tau1!r}, {tau2!r}; fix: pass positive taus")
    sw, s = probs_window.shape[2], probs_window.shape[3]
    a = probs_window[..., : s - sw].float()
    if a.shape[-1] == 0:
        return torch.zeros((), dtype=torch.float64, device=a.device)
    ent = -(a * torch.log(a + _EPS)).sum(dtype=torch.float64)
    var = a.var(dim=-2, correction=1 if sw > 1 else 0).sum(dtype=torch.float64)
    # clamp: A = 1 gives -log(1 + 1e-10) < 0 by a hair; x ** (1/tau) of a negative is NaN
    return ent.clamp_min(0) ** (1.0 / tau1) * var.clamp_min(0) ** (1.0 / tau2)


def eviction_indicator(
    probs_window: torch.Tensor, gamma: float = 200.0, kernel: int = 5, kv_heads: int | None = None
) -> torch.Tensor:
    """CAKE's attention-shift tolerant indicator of the prefix tokens: [B, Hkv, S − Sw] float32.

    probs_window: [B, Hq, Sw, S] (``window_attention``). I = Mean_i A + γ · Var_i A (unbiased, over the Sw window
    rows), prefix columns only, avg-pooled along the sequence (``kernel``, stride 1, zero padding counted, as
    ``F.avg_pool1d``), then averaged over the ``Hq / kv_heads`` query heads of each KV group (default: MHA).
    """
    b, hq, sw, s = probs_window.shape
    kv = hq if kv_heads is None else kv_heads
    if kv <= 0 or hq % kv:
        raise ValueError(f"eviction_indicator: kv_heads must divide the {hq} query heads, got {kv_heads!r}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"eviction_indicator: kernel expected an odd int >= 1, got {kernel!r}")
    n = s - sw
    a = probs_window.float()
    ind = a.mean(dim=-2) + gamma * a.var(dim=-2, correction=1 if sw > 1 else 0)  # [B, Hq, S]
    ind = ind[..., :n]
    if n == 0:
        return ind.reshape(b, kv, hq // kv, 0).mean(dim=2)
    ind = F.avg_pool1d(ind, kernel_size=kernel, stride=1, padding=kernel // 2)
    return ind.reshape(b, kv, hq // kv, n).mean(dim=2)


def allocate_budgets(prefs: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Split ``total`` tokens over layers in proportion to ``prefs``, at most ``caps[l]`` each; sums to
    min(total, Σ caps).

    The Sainte-Laguë divisor method with caps: tokens go one at a time to the layer with the largest
    pref / (given + 0.5) among those below their cap (ties: fewer tokens given, then the lower layer). So each layer
    gets its proportional share rounded to nearest, a capped layer's excess goes to the others in proportion, and a
    layer's budget never grows when a layer is appended (CAKE's Prop. 1, exact in integers). Layers with pref 0 get
    tokens only once all the others are capped, then evenly. NaN prefs count as 0.
    """
    if len(prefs) != len(caps):
        raise ValueError(f"allocate_budgets: expected one cap per pref, got {len(prefs)} prefs, {len(caps)} caps")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"allocate_budgets: total expected an int >= 0, got {total!r}")
    caps = [int(c) for c in caps]
    if any(c < 0 for c in caps):
        raise ValueError(f"allocate_budgets: caps expected ints >= 0, got {caps}")
    p = [float(x) for x in prefs]
    if any(x < 0 or math.isinf(x) for x in p):
        raise ValueError(f"allocate_budgets: prefs expected finite values >= 0, got {p}")
    p = [0.0 if math.isnan(x) else x for x in p]
    if total >= sum(caps):
        return caps
    out = [0] * len(p)
    pos = [i for i, x in enumerate(p) if x > 0 and caps[i] > 0]
    left = total
    if pos:
        left -= _divisor_fill(p, caps, pos, min(total, sum(caps[i] for i in pos)), out)
    if left > 0:  # every positive layer is capped: the rest evenly over the others
        _even_fill(caps, [i for i in range(len(p)) if i not in set(pos)], left, out)
    return out


def _divisor_fill(p: list[float], caps: list[int], idx: list[int], seats: int, out: list[int]) -> int:
    """Sainte-Laguë with caps over layers ``idx`` (prefs > 0): writes ``out``, returns the seats given (= seats)."""

    def prio(i: int, s: int) -> float:  # the one expression every comparison uses: consistent rounding
        return p[i] / (s + 0.5)

    def count(t: float) -> int:  # seats with priority > t, per layer, written to out
        n = 0
        for i in idx:
            x = p[i] / t  # may overflow to inf for a tiny t: then the cap
            s = caps[i] if x >= caps[i] + 1 else min(caps[i], max(0, int(x + 0.5)))
            while s > 0 and not prio(i, s - 1) > t:
                s -= 1
            while s < caps[i] and prio(i, s) > t:
                s += 1
            out[i] = s
            n += s
        return n

    # Bisect a threshold t with count(t) <= seats (count falls as t rises), then hand the rest out in priority order.
    lo_t, hi_t = 0.0, max(prio(i, 0) for i in idx)  # count(hi_t) = 0
    for _ in range(200):
        mid = (lo_t + hi_t) / 2
        if mid <= lo_t or mid >= hi_t:
            break
        if count(mid) <= seats:
            hi_t = mid
        else:
            lo_t = mid
    given = count(hi_t)
    heap = [(-prio(i, out[i]), out[i], i) for i in idx if out[i] < caps[i]]
    heapq.heapify(heap)
    while given < seats:
        _, _, i = heapq.heappop(heap)
        out[i] += 1
        given += 1
        if out[i] < caps[i]:
            heapq.heappush(heap, (-prio(i, out[i]), out[i], i))
    return given


def _even_fill(caps: list[int], idx: list[int], seats: int, out: list[int]) -> None:
    # Round-robin in layer order, skipping full layers: the level every open layer reaches, then one more each for
    # the lowest layers still open.
    open_ = [i for i in sorted(idx) if out[i] < caps[i]]
    while seats > 0 and open_:
        room = [caps[i] - out[i] for i in open_]
        step = min(min(room), seats // len(open_))
        if step == 0:
            for i in open_[:seats]:
                out[i] += 1
            return
        for i in open_:
            out[i] += step
        seats -= step * len(open_)
        open_ = [i for i in open_ if out[i] < caps[i]]


# -- options --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CakeOptions:
    """CAKE's hyperparameters (``Config.policy_options``); defaults from the code's ``pred_cake.py``."""

    budget: int | float = 1024
    window: int = 32
    gamma: float = 200.0
    tau1: float = 1.0
    tau2: float = 1.0
    kernel: int = 5
    decode_evict: bool = True
    static: bool | str = "auto"

    def __post_init__(self) -> None:
        def bad(field: str, want: str, fix: str) -> ValueError:
            return ValueError(f"specache cake: policy_options[{field!r}] expected {want}, got "
                              f"{getattr(self, field)!r}; fix: {fix}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.window) or self.window < 1:
            raise bad("window", "an int >= 1", "window=32 (the paper's observation window)")
        b = self.budget
        if is_int(b):
            if b <= self.window:
                raise bad("budget", f"an int > window ({self.window}): tokens per layer, window included",
                          "a larger budget (e.g. 1024), or a float in (0, 1] for a fraction of the prompt")
        elif isinstance(b, float):
            if not 0.0 < b <= 1.0:
                raise bad("budget", "a float in (0, 1] (fraction of the prompt) or an int (tokens per layer)",
                          "e.g. budget=0.1 or budget=1024")
        else:
            raise bad("budget", "an int (tokens per layer) or a float in (0, 1]", "e.g. budget=1024")
        for name in ("gamma", "tau1", "tau2"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise bad(name, "a finite number", "see the CAKE docstring for defaults")
        if self.gamma < 0:
            raise bad("gamma", "a number >= 0", "gamma=200.0 (the paper's default)")
        for name in ("tau1", "tau2"):
            if getattr(self, name) <= 0:
                raise bad(name, "a number > 0", f"{name}=1.0 (the code's fallback)")
        if not is_int(self.kernel) or self.kernel < 1 or self.kernel % 2 == 0:
            raise bad("kernel", "an odd int >= 1", "kernel=5 (the code's avg_pool1d width)")
        if not isinstance(self.decode_evict, bool):
            raise bad("decode_evict", "True or False", "decode_evict=True (the code's per-step eviction)")
        if not isinstance(self.static, (bool, str)) or self.static not in (True, False, "auto"):
            raise bad("static", "True, False or 'auto'", "static='auto' (the default: the fixed-shape decode path "
                      "where the cache writes by position) or True / False")

    @classmethod
    def parse(cls, opts: dict[str, Any]) -> CakeOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"specache cake: unknown policy_options {unknown}; expected some of {sorted(known)}; "
                             "fix: drop or rename them")
        return cls(**opts)

    def per_layer(self, prompt: int) -> int:
        """C: tokens per layer (window included) for a prompt of ``prompt`` tokens."""
        if isinstance(self.budget, float):
            return math.ceil(self.budget * prompt)
        return self.budget


# -- the policy -----------------------------------------------------------------------------------------------------


@register_policy
class CakePolicy(Policy):
    """CAKE (see the module docstring). Device state per site (``site.tier``): ``k``, ``v`` [B, Hkv, cap, D] the kept
    rows in ascending position order (first ``n`` used), ``pos`` [B, Hkv, cap] their store positions, and until the
    prefill's budgets are final ``ind`` [B, Hkv, np] the indicator of the ``np`` kept prefix rows. On the static path
    ``static`` (cake_static.CakeRows) takes k, v and pos over at the site's first decode step."""

    name = "cake"
    uses_store = False

    def __init__(self, config):
        super().__init__(config)
        self.options = CakeOptions.parse(dict(config.policy_options))
        parse_static(self, self.options.static, [])
        self.layers: int | None = None  # attention sites per forward: learnt from the first sequence
        self._seq: list = []  # sites prefilled in this sequence, in order
        self._names: set[str] = set()
        self._prefs: list[float] = []
        self._caps: list[int] = []
        self._per_layer = 0  # C for this sequence's prompt
        self._pending = False  # budgets not final yet: finalised at the first decode token
        self._decoding = False

    # -- sequence bookkeeping -----------------------------------------------------------------------------------------
    def reset(self, site):
        if site.name in self._names or self._decoding:
            self._new_sequence()
        site.clear_state()

    def _new_sequence(self) -> None:
        if self._seq:  # the last sequence's prefill ran every site: that is L
            self.layers = len(self._seq)
        self._seq, self._names, self._prefs, self._caps = [], set(), [], []
        self._pending = self._decoding = False

    # -- prefill ------------------------------------------------------------------------------------------------------
    def prefill(self, site, view):
        o = self.options
        n_tok = view.hi - view.lo
        if "k" in site.tier or view.start != view.lo or view.k.shape[2] != n_tok or view.q.shape[2] != n_tok:
            raise RuntimeError(
                f"specache cake: site {site.name}: a multi-token call over positions [{view.lo}, {view.hi}) after "
                "this sequence's prefill; CAKE decides its budgets once per prompt. Fix: prefill the prompt in one "
                "call and decode one token per step."
            )
        sw = min(o.window, n_tok)
        probs = window_attention(view.q, view.k, view.scale, view.bias(sw), sw)  # [B, Hq, Sw, S]
        # NOTE: a host sync per layer (prefill only): the allocation runs on the host.
        pref = float(layer_preference(probs, o.tau1, o.tau2))
        ind = eviction_indicator(probs, o.gamma, o.kernel, site.heads)  # [B, Hkv, S - Sw]
        del probs
        b, h = site.batch, site.heads
        t = site.tier
        t["k"], t["v"] = view.k.contiguous(), view.v.contiguous()
        t["pos"] = (torch.arange(view.lo, view.hi, device=site.device)).expand(b, h, n_tok).contiguous()
        t["ind"] = ind
        t["n"], t["np"], t["sw"], t["pref"] = n_tok, n_tok - sw, sw, pref
        t["budget"] = n_tok - sw
        if not self._seq:
            self._per_layer = o.per_layer(n_tok)
        self._seq.append(site)
        self._names.add(site.name)
        self._prefs.append(pref)
        self._caps.append(n_tok - sw)
        m = len(self._seq)
        if self.layers is None or m > self.layers:
            if self.layers is not None:
                log.warning("specache cake: %d attention sites in this prefill, %d in the last; budgets decided at "
                            "the first decode step instead of cascading", m, self.layers)
                self.layers = None
            self._pending = True
            return
        # Cascading: budgets over layers 0..m-1 with the whole model's B_total; evict where a budget shrank.
        budgets = allocate_budgets(self._prefs, self._total(self.layers), self._caps)
        for s, bud in zip(self._seq, budgets):
            self._evict(s, bud)
        self._pending = m < self.layers
        if m == self.layers:
            self._finalise()

    def _total(self, layers: int) -> int:
        return max(0, self._per_layer - self.options.window) * layers

    def _evict(self, site, budget: int) -> None:
        t = site.tier
        n, npre = t["n"], t["np"]
        t["budget"] = min(t["budget"], budget)
        if npre <= budget:
            return
        b, h = site.batch, site.heads
        keep = ops.topk_positions(t["ind"], budget)  # [B, Hkv, budget] prefix rows, ascending
        rows = torch.cat([keep, torch.arange(npre, n, device=keep.device).expand(b, h, n - npre)], dim=2)
        t["ind"] = t["ind"].gather(2, keep)
        _gather_rows(t, rows)
        t["n"], t["np"] = budget + n - npre, budget

    def _finalise(self) -> None:
        """Budgets of this sequence are final: evict (one-shot when nothing cascaded), size the decode buffers."""
        o = self.options
        total = self._total(len(self._seq))
        budgets = allocate_budgets(self._prefs, total, self._caps)
        fits = sum(self._caps) <= total
        for s, bud in zip(self._seq, budgets):
            self._evict(s, bud)
            t = s.tier
            t.pop("ind", None)
            # The decode rule keeps B_l + S_w rows; a prompt that fits may grow to C first (the code's key_size).
            t["budget"] = max(bud, self._per_layer - o.window) if fits else bud
            cap = t["budget"] + t["sw"] + 1 if o.decode_evict else t["n"] + 64
            _resize(t, max(cap, t["n"]))
        if self.layers is None:
            self.layers = len(self._seq)
        self._pending = False

    # -- decode -------------------------------------------------------------------------------------------------------
    def append(self, site, k, v, start):
        t = site.tier
        if "k" not in t:  # the prefill's own tokens: prefill() takes them from its view
            return
        if self._pending:
            self._finalise()
        # k, v: [B, Hkv, Sn, D], positions [start, start + Sn)
        sn, n = k.shape[2], t["n"]
        if n + sn > t["k"].shape[2]:
            _resize(t, n + sn + max(64, (n + sn) // 4))
        t["k"][:, :, n : n + sn].copy_(k)
        t["v"][:, :, n : n + sn].copy_(v)
        t["pos"][:, :, n : n + sn].copy_(torch.arange(start, start + sn, device=t["pos"].device))
        t["n"] = n + sn

    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, 1, D]; bias [B|1, Hq|1, 1, hi - lo] over store positions [lo, hi) or None
        if self._pending:
            self._finalise()
        self._decoding = True
        t = site.tier
        n = t["n"]
        k, v, pos = t["k"][:, :, :n], t["v"][:, :, :n], t["pos"][:, :, :n]
        kb = _kept_bias(bias, pos, lo, q.shape[1])
        out = ops.sparse_attention(q, k, v, kb, scale)
        keep = t["budget"] + t["sw"]
        if self.options.decode_evict and n > keep:
            self._decode_evict(site, q, k, kb, scale, n, keep)
        return out

    def _decode_evict(self, site, q, k, kb, scale, n, keep) -> None:
        """The code's decode rule: the new query's probabilities over the non-window rows, pooled, GQA-averaged;
        keep the top ``budget`` of them and the ``sw`` most recent rows."""
        t, sw = site.tier, site.tier["sw"]
        b, hq = q.shape[:2]
        h = site.heads
        logits = ops.attention_logits(q, k, scale)  # [B, Hq, 1, n] float32
        if kb is not None:
            logits = logits + kb
        p = _safe_softmax(logits)[:, :, 0, : n - sw]  # [B, Hq, n - sw]
        kern = self.options.kernel
        p = F.avg_pool1d(p, kernel_size=kern, stride=1, padding=kern // 2)
        score = p.reshape(b, h, hq // h, n - sw).mean(dim=2)
        kept = ops.topk_positions(score, keep - sw)  # [B, Hkv, budget] ascending
        rows = torch.cat([kept, torch.arange(n - sw, n, device=kept.device).expand(b, h, sw)], dim=2)
        # gather first (new tensors), then write back into the same buffers: no aliasing between the two
        for name in ("k", "v"):
            x = t[name]
            x[:, :, :keep].copy_(x[:, :, :n].gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])))
        t["pos"][:, :, :keep].copy_(t["pos"][:, :, :n].gather(2, rows))
        t["n"] = keep

    def decode_static(self, site, q, k_new, v_new, pos, bias, scale, n_real, speculating):
        # the kept rows at a fixed number of slots, written by the device position (policies/cake_static.py, which
        # imports this module)
        from .cake_static import cake_state, grown

        if self._pending:
            self._finalise()
        self._decoding = True
        if site.static is None:
            site.static = cake_state(self, site, bias.shape[-1])
        elif not site.static.fits(site):
            site.static = grown(site, site.static)
        return site.static.step(q, k_new, v_new, pos, bias, scale)

    # -- reporting ----------------------------------------------------------------------------------------------------
    def site_report(self, site):
        t = site.tier
        if "n" not in t:
            return {}
        # NOTE: a host read of the static state's row count (reporting only)
        kept = int(site.static.used) if site.static is not None else t["n"]
        return {"cake_budget": t["budget"], "cake_window": t["sw"], "cake_kept": kept, "cake_pref": t["pref"]}

    def budgets(self) -> dict[str, int]:
        """Per-site non-window budget B_l of the current sequence (final after its first decode step)."""
        return {s.name: s.tier["budget"] for s in self._seq if "budget" in s.tier}

    def describe(self):
        return {"policy": self.name, **asdict(self.options), "static": self.static}


def _gather_rows(t: dict, rows: torch.Tensor) -> None:
    # rows: [B, Hkv, m] row indices into the first t["n"] rows; k, v, pos become exactly m rows (fresh tensors)
    n = t["n"]
    for name in ("k", "v"):
        x = t[name][:, :, :n]
        t[name] = x.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    t["pos"] = t["pos"][:, :, :n].gather(2, rows)


def _resize(t: dict, cap: int) -> None:
    """Reallocate k, v, pos to ``cap`` rows (the device bytes reported are the capacity), keeping the n used."""
    n = t["n"]
    for name in ("k", "v", "pos"):
        x = t[name]
        if x.shape[2] == cap:
            continue
        new = x.new_empty((*x.shape[:2], cap, *x.shape[3:]))
        new[:, :, :n].copy_(x[:, :, :n])
        t[name] = new


def _kept_bias(bias: torch.Tensor | None, pos: torch.Tensor, lo: int, hq: int) -> torch.Tensor | None:
    """The model's decode bias over store positions [lo, hi) read at the kept rows' positions: [B, Hq, 1, n]; rows
    below ``lo`` (slid out of a sliding window) are masked. None when nothing is masked."""
    b, h, n = pos.shape
    if bias is None and lo == 0:
        return None
    rel = (pos - lo).repeat_interleave(hq // h, dim=1)  # [B, Hq, n]
    valid = (rel >= 0).unsqueeze(2)
    if bias is None:
        return torch.zeros(valid.shape, dtype=torch.float32, device=pos.device).masked_fill_(~valid, float("-inf"))
    full = bias.float().expand(b, hq, 1, bias.shape[-1])
    got = full.gather(3, rel.clamp_min(0).unsqueeze(2))
    return got.masked_fill(~valid, float("-inf"))
