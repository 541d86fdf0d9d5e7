"""Find attention in a traced graph and replace it with ``specache::attend``.

Two families, each matched structurally on the Dynamo graph (torch-level calls, methods and operators):

- SDPA: ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``.
- matmul → softmax → matmul: ``softmax(q @ kᵀ · c + mask, -1) @ v`` with any of the casts, scalings, mask add and
  no-op dropout that eager attention implementations put between them (transformers' ``eager_attention_forward``,
  GPT-2's, hand-written modules).

``flex_attention`` (the higher-order op) is counted and left alone: its score_mod and block mask are code the policies'
kernels do not run.

A matched attention is rewritten only if its k and v trace back to a KV-cache write (passes/kv_source.py) and nothing
but the attention reads the cached tensors' values. Otherwise it keeps its original code, is counted as skipped, and
one WARNING names the node and the reason. Negative cases (dropout, returned attention probabilities, a softmax that
is not attention, an attention without a cache) are tested in tests/passes/.

A hand-written structural matcher rather than Inductor's pattern_matcher: Dynamo graphs spell the same computation
many ways (``x.softmax(-1)``, ``F.softmax(x, dim=-1, dtype=...)``, ``torch.matmul``, ``@``, ``x.transpose(-1, -2)``,
``x.mT``) and the interesting part, the cache write, is in-place, which pattern_matcher's functional patterns do not
express.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from .. import attend_op  # noqa: F401  (registers torch.ops.specache.attend / refuse)
from ..kernels import ops  # noqa: F401  (registers the kernels' ops)
from .kv_source import INDEX, WINDOW, KVSource, Skip, check_pair, ev, is_fn, is_method, peel, resolve, shape_only_users

log = logging.getLogger("specache")

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
         torch.ops.aten.scaled_dot_product_attention.default)
_SOFTMAX = (F.softmax, torch.softmax, torch.nn.functional.softmax, torch.special.softmax)
_MATMUL = (torch.matmul, operator.matmul, torch.bmm)
_ADD = (operator.add, torch.add, operator.iadd)
_MUL = (operator.mul, torch.mul, operator.imul)
_DIV = (operator.truediv, torch.div, torch.true_divide, operator.itruediv)
_CAST_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "contiguous")
_warned: set[tuple[str, str]] = set()


@dataclass
class Match:
    node: fx.Node  # the node whose value is the attention output [B, Hq, Sq, Dv]
    kind: str  # "sdpa" | "matmul"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None = None
    is_causal: bool = False
    scale: float | None = None
    gqa: bool = False  # SDPA enable_gqa: k/v carry Hkv heads
    chain: list[fx.Node] = field(default_factory=list)  # pattern nodes between q/k/v and node, to drop


@dataclass
class SiteReport:
    site: str
    kind: str
    status: str  # "rewritten" | "skipped"
    reason: str = ""
    mode: str = ""


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _last_dim(node: fx.Node, dim) -> bool:
    val = ev(node)
    return dim == -1 or (val is not None and dim == val.dim() - 1)


# -- matching -------------------------------------------------------------------------------------------------------


def _match_sdpa(node: fx.Node) -> Match:
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _arg(node, 3, "attn_mask")
    dropout = _arg(node, 4, "dropout_p", 0.0)
    is_causal = _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale", None)
    gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
    m = Match(node, "sdpa", q, k, v, mask, bool(is_causal), scale, bool(gqa))
    if isinstance(dropout, fx.Node) or dropout != 0.0:
        raise Skip(f"attention dropout p={dropout!r} (training?): specache rewrites inference attention only")
    if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, (int, float))):
        raise Skip("is_causal or scale is a traced value, not a constant")
    if mask is not None and not isinstance(mask, fx.Node):
        raise Skip(f"unsupported attn_mask {mask!r}")
    return m


def _is_transpose_last2(node) -> fx.Node | None:
    """k if node is kᵀ over the last two dims of a 4-D k."""
    if is_method(node, "transpose") or is_fn(node, torch.transpose):
        a, b = node.args[1], node.args[2]
        if {a, b} in ({-1, -2}, {2, 3}):
            return node.args[0]
    if is_method(node, "permute") and tuple(node.args[1:]) in ((0, 1, 3, 2),) or (
        is_method(node, "permute") and len(node.args) == 2 and tuple(node.args[1]) == (0, 1, 3, 2)
    ):
        return node.args[0]
    if is_fn(node, getattr) and node.args[1] == "mT":
        return node.args[0]
    return None


def _upstream(node: fx.Node) -> tuple[fx.Node, fx.Node | None, float, list[fx.Node]]:
    """From the softmax input back to q @ kᵀ: returns (matmul, mask, scale, chain)."""
    mask, scale, chain = None, 1.0, []
    cur = node
    for _ in range(16):
        chain.append(cur)
        if is_method(cur, *_CAST_METHODS) or is_fn(cur, torch.Tensor.to):
            src, out = ev(cur.args[0]), ev(cur)
            if src is None or out is None or src.shape != out.shape:
                raise Skip(f"unsupported op between q·kᵀ and softmax: {cur.format_node()}")
            cur = cur.args[0]
        elif is_fn(cur, *_MATMUL) or is_method(cur, "matmul"):
            if _is_transpose_last2(cur.args[1]) is None:
                raise Skip(f"the q·k matmul's right operand is not kᵀ: {cur.format_node()}")
            return cur, mask, scale, chain
        elif is_fn(cur, *_ADD) or is_method(cur, "add", "add_"):
            a, b = cur.args[0], cur.args[1]
            if len(cur.args) > 2 or "alpha" in cur.kwargs:
                raise Skip(f"a scaled mask add: {cur.format_node()}")
            left = _reaches_qk(a)
            if left == _reaches_qk(b):
                raise Skip(f"cannot tell scores from mask in {cur.format_node()}")
            scores, m = (a, b) if left else (b, a)
            if mask is not None or not isinstance(m, fx.Node):
                raise Skip(f"more than one additive term on the scores: {cur.format_node()}")
            mask, cur = m, scores
        elif is_fn(cur, *_MUL) or is_method(cur, "mul"):
            a, b = cur.args[0], cur.args[1]
            c, x = (a, b) if isinstance(a, (int, float)) else (b, a)
            if not isinstance(c, (int, float)) or not isinstance(x, fx.Node):
                raise Skip(f"scores scaled by a traced value: {cur.format_node()}")
            scale, cur = scale * c, x
        elif is_fn(cur, *_DIV) or is_method(cur, "div"):
            x, c = cur.args[0], cur.args[1]
            if not isinstance(c, (int, float)) or not isinstance(x, fx.Node):
                raise Skip(f"scores divided by a traced value: {cur.format_node()}")
            scale, cur = scale / c, x
        else:
            raise Skip(f"unsupported op between q·kᵀ and softmax: {cur.format_node()}")
    raise Skip("too many ops between q·kᵀ and softmax")


# Learned projections: scores never pass through one on their way to the softmax, so a walk back stops there (else a
# router's softmax over gate(norm(x)) walked on into the attention that produced x and was counted as attention).
_LEARNED = (F.linear, F.embedding, F.conv1d, F.conv2d)


def _walk_back(node, pred, depth: int = 8) -> fx.Node | None:
    """The first node, walking back from ``node`` through the ops that feed it (every argument, depth-first, at most
    ``depth`` ops along a path, never past a learned projection), for which ``pred`` says True; None if none does.
    ``pred`` returns True (this one), False (walk on into its arguments) or None (stop: nothing on this path counts)."""
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or is_fn(node, *_LEARNED):
            return None  # a linear layer's output is logits of its own (a router's), whatever fed its input
        hit = pred(node)
        if hit is not False:
            return node if hit else None
        # every input node, list arguments too: a softmax over torch.cat([scores, sink_logits]) leads to its scores
        nxt = node.all_input_nodes
        if len(nxt) != 1:
            return next((f for f in (_walk_back(a, pred, depth - 1) for a in nxt) if f is not None), None)
        node = nxt[0]
    return None


def _is_qk(node) -> bool:
    return (is_fn(node, *_MATMUL) or is_method(node, "matmul")) and _is_transpose_last2(node.args[1]) is not None


def _reaches_qk(node, depth: int = 8) -> bool:
    """Does ``node`` lead back, through elementwise ops, to a matmul with kᵀ (i.e. is it the scores)?"""
    return _walk_back(node, _is_qk, depth) is not None


# Products of two activations that attention scores are also spelled with (Bloom's ``alibi.baddbmm(q, k)`` over a key
# cache stored transposed, ``torch.bmm(q, k)``, ``einsum``): the pass rewrites only ``q @ k.transpose(-1, -2)``, so a
# softmax fed by one of these is counted as an attention it leaves alone, with the reason, rather than not at all.
_PRODUCT_FNS = (torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, torch.einsum)
_PRODUCT_METHODS = ("matmul", "bmm", "baddbmm", "__matmul__")
_VIEW_METHODS = ("t", "transpose", "permute", "view", "reshape", "contiguous", "to", "float", "half", "bfloat16")


def _is_param(node, depth: int = 6) -> bool:
    """Does ``node`` come (through views and casts) from a module's parameter or buffer?"""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return False
        if node.op == "get_attr":
            return True
        if node.op == "placeholder":  # Dynamo lifts parameters as inputs named L_self_..._parameters_weight_
            return isinstance(node.meta.get("example_value"), torch.nn.Parameter) or "_parameters_" in node.name
        if is_method(node, *_VIEW_METHODS) or is_fn(node, torch.transpose, torch.t, torch.permute, torch.reshape):
            node = node.args[0]
        elif is_fn(node, getattr) and node.args[1] in ("mT", "T"):
            node = node.args[0]
        else:
            return False
    return False


def _activation_product(node) -> bool | None:
    """True for a product of two activations, None (stop) for a product with a parameter, False for anything else."""
    if not (is_fn(node, *_PRODUCT_FNS) or is_method(node, *_PRODUCT_METHODS)):
        return False
    if is_fn(node, torch.einsum):
        ops_ = [a for a in node.args[1:] if isinstance(a, fx.Node)]
    elif is_fn(node, torch.baddbmm) or is_method(node, "baddbmm"):
        ops_ = [node.kwargs.get("batch1", node.args[1] if len(node.args) > 1 else None),
                node.kwargs.get("batch2", node.args[2] if len(node.args) > 2 else None)]
    else:
        ops_ = list(node.args[:2])
    return (len(ops_) == 2 and all(isinstance(a, fx.Node) and not _is_param(a) for a in ops_)) or None


def _score_product(node, depth: int = 8) -> fx.Node | None:
    """The product of two activations ``node`` leads back to through elementwise ops (scores the pass does not
    rewrite), or None (a softmax over a linear layer's logits: a router or a sampler, not attention)."""
    return _walk_back(node, _activation_product, depth)


def _match_softmax(node: fx.Node) -> Match | None:
    """A softmax over the last dim; None if it is not attention at all (no product of two activations upstream)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    dim = _arg(node, 1, "dim")
    if not isinstance(x, fx.Node):
        return None
    if not _reaches_qk(x):
        prod = _score_product(x)
        if prod is None:
            return None  # a softmax that is not attention (router, sampler): not counted
        raise Skip(f"attention scores from {prod.format_node()}: the pass rewrites q @ k.transpose(-1, -2) "
                   "(matmul or @) and scaled_dot_product_attention only")
    if not _last_dim(node, dim):
        raise Skip(f"softmax over dim {dim!r}, not the key dim")
    qk, mask, scale, up = _upstream(x)
    q, k = qk.args[0], _is_transpose_last2(qk.args[1])
    chain = [node, qk.args[1], qk, *up]
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            raise Skip(f"the attention probabilities ({cur.name}) are used {len(users)} times "
                       "(returned with output_attentions?): specache never materialises them")
        u = users[0]
        if is_method(u, *_CAST_METHODS) or is_fn(u, torch.Tensor.to):
            cur = u
        elif is_fn(u, F.dropout, torch.dropout, torch.nn.functional.dropout):
            p = _arg(u, 1, "p", 0.5)
            training = _arg(u, 2, "training", True)
            if not (p == 0.0 or training is False):
                raise Skip(f"attention dropout p={p!r}, training={training!r}")
            cur = u
        elif (is_fn(u, *_MATMUL) or is_method(u, "matmul")) and u.args[0] is cur:
            return Match(u, "matmul", q, k, u.args[1], mask, False, scale, False, chain=chain + _between(node, u))
        else:
            raise Skip(f"unsupported op after softmax: {u.format_node()}")


def _between(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    out, cur = [], start
    while cur is not end:
        cur = next(iter(cur.users))
        out.append(cur)
    return out[:-1]


def find(graph: fx.Graph) -> list[tuple[fx.Node, str, Match | Skip]]:
    """Every attention in graph order, with its match or the reason it cannot be matched."""
    out = []
    for node in graph.nodes:
        try:
            if is_fn(node, *_SDPA):
                out.append((node, "sdpa", _match_sdpa(node)))
            elif is_fn(node, *_SOFTMAX) or is_method(node, "softmax"):
                m = _match_softmax(node)
                if m is not None:
                    out.append((node, "matmul", m))
            elif node.op == "call_function" and str(node.target) == "flex_attention":  # the higher-order op
                out.append((node, "flex", Skip(
                    "flex_attention (a score_mod / block mask the policies' kernels do not apply): not rewritten; "
                    "fix: load the model with attn_implementation='sdpa' or 'eager'")))
        except Skip as why:
            out.append((node, "sdpa" if is_fn(node, *_SDPA) else "matmul", why))
    return out


# -- naming ---------------------------------------------------------------------------------------------------------


def site_name(node: fx.Node, param_module=None) -> str:
    """A name stable across the graphs of one model (prefill, decode, recompiles, graph breaks): the path of the
    innermost module the attention was traced in; where Dynamo recorded no module (a frame resumed after a graph
    break inside the attention's forward), the module owning the first parameter the attention's inputs come from
    (``param_module`` maps a graph input holding a parameter to that module's path). "" if neither is known."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        # the frame's local the module came from: L['self'] (a forward), L['args'][0] (a forward wrapped by a
        # decorator that passes self on, as Bloom's), self.
        path = re.sub(r"^(L\[[^\]]*\](\[[^\]]*\])*\.?|self\.)", "", path)
        return path or "model"
    owner = _owner(node, param_module)
    return param_module(owner) if owner is not None else ""


def _owner(node: fx.Node, param_module) -> fx.Node | None:
    """The graph input holding the nearest parameter the attention's inputs come from (q's projection), if any."""
    if param_module is not None:
        seen, todo = set(), [node]
        while todo:  # breadth first: the nearest parameter (q's projection) names the attention's module
            cur = todo.pop(0)
            if cur in seen or len(seen) > 256:
                continue
            seen.add(cur)
            if cur.op == "placeholder":
                if param_module(cur):
                    return cur
                continue
            todo += cur.all_input_nodes
    return None


# -- rewriting ------------------------------------------------------------------------------------------------------


def _size(graph: fx.Graph, node: fx.Node, dim: int):
    """node.shape[dim] as a constant when static, else a sym_size node."""
    val = ev(node)
    s = val.shape[dim]
    if isinstance(s, int):
        return s
    return graph.call_function(torch.ops.aten.sym_size.int, (node, dim))


def _placeholder(graph: fx.Graph, token: fx.Node, new: fx.Node, seq_len) -> fx.Node:
    """The site's cache token [B, 1, 1, 1] expanded to [B, H, S, D]: what the model's cache object keeps instead of
    the KV.

    The model's cache (DynamicCache, StaticCache) still needs tensors of the right shape (it derives positions and
    masks from ``keys.shape[-2]``), but after the rewrite nothing reads their values: B elements stand for the whole
    tensor. Returned as a graph output, it becomes the cache's attribute; fed back next step, it is the ``past`` the
    next cat would have read, and the runtime recognises its storage (a crop keeps it, a copy or a beam reorder does
    not; a reorder's values are the row ids it picked).
    """
    sizes = [_size(graph, new, 0), _size(graph, new, 1), seq_len, _size(graph, new, 3)]
    return graph.call_method("expand", (token, *sizes))


def _base_len(graph: fx.Graph, src: KVSource):
    if src.mode == INDEX:
        return _size(graph, src.base, 2)
    sn = _size(graph, src.new, 2)
    pv = ev(src.past)
    if pv.dim() != 4:  # the empty tensor([]) an uninitialised DynamicLayer holds
        return sn
    past = _size(graph, src.past, 2)
    if isinstance(past, int) and isinstance(sn, int):
        return past + sn
    return graph.call_function(operator.add, (past, sn))


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase candidates (and their now-dead inputs among them) that have no users left. Only these: a general DCE
    would also drop in-place ops it cannot see are needed (a cache's length counter's ``add_``)."""
    pending = set(candidates)
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if not n.users:
                graph.erase_node(n)
                pending.discard(n)
                changed = True


_SLIDING_KEPT = ("a sliding-window layer: the model's own cache already keeps only its last tokens on the device, "
                 "fewer bytes than any policy's state over the whole history (sliding_layers='model'; "
                 "sliding_layers='rewrite' rewrites it)")


def rewrite(gm: fx.GraphModule, handle: int, param_module=None, sliding_layers: str = "model") -> list[SiteReport]:
    """Rewrite every attention of ``gm`` it can; returns a report per attention found. ``param_module`` maps a graph
    input holding a parameter to its attention module's path (site names where Dynamo recorded no module stack).
    ``sliding_layers="model"`` leaves an attention whose cache keeps a tail slice (a sliding-window layer) to the
    model's own cache; ``"rewrite"`` rewrites it like any other."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    reports: list[SiteReport] = []
    seen: dict[str, int] = {}
    for node, kind, match in find(graph):
        name = site_name(node, param_module) or "attention"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name] - 1}"
        try:
            if isinstance(match, Skip):
                raise match
            ks, vs = resolve(match.k, match.node, order), resolve(match.v, match.node, order)
            check_pair(ks, vs)
            if ks.mode == WINDOW and sliding_layers == "model":
                reports.append(SiteReport(name, kind, "skipped", _SLIDING_KEPT))
                counters["specache"]["attention_sliding_kept"] += 1
                log.info("specache: attention %s (%s) is %s", name, kind, _SLIDING_KEPT)
                continue
            _check_shapes(match, ks)
            for src in (ks, vs):
                allowed = set(src.chain) | set(match.chain) | {match.node, *src.writers}
                bad = shape_only_users(src.base, allowed)
                if bad:
                    raise Skip(f"the cached tensor {src.base.name} is also read by {bad[0].format_node()}")
            at = _insertion_point(match, ks, vs, order)
        except Skip as why:
            if not isinstance(match, Skip) and _refuse_placeholder_read(graph, match, name):
                why = Skip(f"{why}; it reads a cache whose KV another graph moved to specache's store, so it raises")
            reports.append(SiteReport(name, kind, "skipped", str(why)))
            counters["specache"]["attention_skipped"] += 1
            if (name, str(why)) not in _warned:
                _warned.add((name, str(why)))
                log.warning("specache: attention %s (%s, node %s) keeps its original code: %s", name, kind,
                            node.name, why)
            continue
        # no module stack: the graph may be shared by every layer, so the site is named at run time from its owner
        owner = None if node.meta.get("nn_module_stack") else _owner(node, param_module)
        _apply(graph, match, ks, vs, handle, name, at, owner)
        counters["specache"]["attention_rewritten"] += 1
        reports.append(SiteReport(name, kind, "rewritten", mode="index" if ks.mode == INDEX else "append"))
        log.debug("specache: rewrote attention %s (%s, %s)", name, kind, reports[-1].mode)
    graph.lint()
    gm.recompile()
    return reports


def _is_placeholder_input(node: fx.Node) -> bool:
    """A graph input holding a specache placeholder: a [B, H, S, D] tensor with zero strides past the batch (no real
    KV is laid out so; Dynamo specialises graphs on such strides, so the check holds for every call of this graph)."""
    val = ev(node)
    return (node.op == "placeholder" and val is not None and val.dim() == 4 and val.numel() > val.shape[0]
            and all(st == 0 for st in val.stride()[1:]))


def _refuse_placeholder_read(graph: fx.Graph, m: Match, name: str) -> bool:
    """An attention left alone that reads a cache whose KV another graph rewrote into the store (cross-attention
    caches written in the first decoder call and read raw after) would read placeholders: make it raise instead."""
    reads = [peel(x)[0] for x in (m.k, m.v)]
    if not any(_is_placeholder_input(r) for r in reads):
        return False
    msg = (f"specache: attention {name} reads a cache that another compiled graph of this model rewrote (its KV is in "
           "specache's store, the cache holds placeholders), and this graph left it alone, so it would read "
           "nothing. Fix: compile with attn_implementation='sdpa' so every call of this attention is rewritten, or "
           "leave this model uncompiled.")
    with graph.inserting_after(m.node):
        out = graph.call_function(torch.ops.specache.refuse.default, (m.node, msg))
    out.meta["example_value"] = ev(m.node)
    m.node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
    return True


def _check_shapes(m: Match, ks: KVSource) -> None:
    qv, kv, nv = ev(m.q), ev(m.k), ev(ks.new)
    if qv is None or qv.dim() != 4 or nv is None:
        raise Skip("q or the new keys are not 4-D [B, H, S, D] tensors")
    hq, hkv = qv.shape[1], nv.shape[1]
    if not isinstance(hq, int) or not isinstance(hkv, int) or hq % hkv:
        raise Skip(f"{hq} query heads do not split into {hkv} KV heads")
    heads_seen = kv.shape[1] if kv is not None else None
    if not m.gqa and heads_seen != hq and m.kind == "sdpa":
        raise Skip(f"k has {heads_seen} heads for {hq} query heads without enable_gqa")


def _cache_readers(src: KVSource, m: Match) -> list[fx.Node]:
    """Nodes other than the attention that hold the cache tensor (graph outputs, a sliding window's tail slice)."""
    if src.base.op != "call_function":
        return []
    return [u for u in src.base.users if u not in src.chain and u is not m.node and u not in src.writers]


def _insertion_point(m: Match, ks: KVSource, vs: KVSource, order: dict[fx.Node, int]) -> fx.Node:
    """Where the attend op goes: before the attention, or earlier when the cache's tensor is kept (a sliding window's
    tail slice) before it, since what the cache keeps is built from the op's token. Every input must precede it."""
    readers = [u for src in (ks, vs) for u in _cache_readers(src, m) if u.op != "output"]
    at = min([m.node, *readers], key=lambda n: order.get(n, 1 << 60))
    inputs = [m.q, ks.new, vs.new, m.mask, ks.write_pos, ks.past]
    late = [x for x in inputs if isinstance(x, fx.Node) and order.get(x, -1) >= order.get(at, 1 << 60)]
    if late:
        raise Skip(f"the cache's tensor is kept ({at.format_node()}) before {late[0].name}, an input of the attention, "
                   "is computed")
    return at


def _apply(graph: fx.Graph, m: Match, ks: KVSource, vs: KVSource, handle: int, name: str, at: fx.Node,
           owner: fx.Node | None = None) -> None:
    qv = ev(m.q)
    scale = m.scale if m.scale is not None else 1.0 / math.sqrt(qv.shape[-1])
    col = ks.col_slice or (None, None)
    # what the cache held before this call: the past it concatenated (absent while the layer is empty), or the buffer
    # (a buffer the graph allocates itself, a lazily initialised StaticCache layer, is new: nothing to compare)
    if ks.mode == INDEX:
        cache = ks.base if ks.base.op in ("placeholder", "get_attr") else None
    else:
        cache = ks.past if ev(ks.past) is not None and ev(ks.past).dim() == 4 else None
    # who else holds each cache tensor, taken before any node is added: the op's own length input may read the same
    # tensor's size (a sym_size under dynamic shapes), and must keep reading the tensor, not its placeholder
    readers = {id(src): _cache_readers(src, m) for src in (ks, vs)}
    with graph.inserting_before(at):
        base_len = _base_len(graph, ks)
        call = graph.call_function(
            torch.ops.specache.attend.default,
            (m.q, ks.new, vs.new, m.mask, cache, ks.write_pos, base_len, col[0], col[1], ks.mode, float(scale),
             m.is_causal, handle, name),
            {"owner": owner} if owner is not None else {},
        )
        out = graph.call_function(operator.getitem, (call, 0))
        token = graph.call_function(operator.getitem, (call, 1))
    kv = ev(ks.new)
    keep = ("nn_module_stack", "stack_trace", "source_fn_stack")
    for n in (call, out, token):
        n.meta.update({k: v for k, v in m.node.meta.items() if k in keep})
    out.meta["example_value"] = ev(m.node)
    token.meta["example_value"] = kv.new_empty((kv.shape[0], 1, 1, 1))
    call.meta["example_value"] = (out.meta["example_value"], token.meta["example_value"])
    m.node.replace_all_uses_with(out)
    dead = [m.node, *m.chain]
    for src in (ks, vs):
        for w in src.writers:
            graph.erase_node(w)
        dead += src.chain
        base = src.base
        # The cache tensor itself (the cat, or a buffer the graph allocated) becomes a placeholder expanded from the
        # site's token for whatever else holds it (the cache object, through the graph's outputs).
        if base.op == "call_function":
            others = readers[id(src)]
            if others:
                with graph.inserting_before(at):
                    seq = _size(graph, base, 2) if src.mode == INDEX else _base_len(graph, src)
                    ph = _placeholder(graph, token, src.new, seq)
                for u in others:
                    u.replace_input_with(base, ph)
            dead.append(base)
            if src.past is not None and src.past.op == "call_function":
                dead.append(src.past)  # the empty tensor([]) of an uninitialised cache layer
    _erase_dead(graph, dead)
