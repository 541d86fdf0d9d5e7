"""Where the keys and values an attention reads come from: the model's KV-cache write, found in the traced graph.

The pass needs the *new* tokens' K and V (to hand them to the store) and how the model's cache lays out the tokens the
attention reads. Walking back from the attention's k (and v) input, it peels what models put between a cache and
attention and stops at one of the two ways caches are written:

- APPEND: ``torch.cat([past, new], dim=-2)``. transformers' DynamicCache (``DynamicLayer.update``) and
  ``DynamicSlidingWindowLayer`` (which then keeps a tail slice of the result).
- INDEX: an in-place write of the new tokens at positions ``pos`` into a preallocated buffer that the attention then
  reads: ``buf.index_copy_(2, pos, new)`` (transformers' StaticCache) or ``buf[:, :, pos] = new`` (gpt-fast,
  nanoGPT-style modules).

Peeled on the way: ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``), ``repeat_interleave(n, dim=1)``,
``contiguous``/``clone``/no-op casts, and one slice along the sequence dim (StaticCache's prefill reads
``keys[:, :, :n]``). Anything else between the cache and the attention stops the walk: that attention is left alone.

This runs on the Dynamo (torch-level) graph, not the ATen graph: there the cache write is one recognisable call
(``torch.cat``, ``index_copy_``, ``setitem``) with the model's own argument structure, before functionalization turns
in-place cache writes into copies and ``repeat_kv`` into ``expand``/``clone``/``_unsafe_view`` chains, and before
decompositions split SDPA. Rewriting there also keeps the pass independent of the inner compiler (Inductor, eager).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..layout import Layout

APPEND, INDEX, WINDOW = Layout.APPEND, Layout.INDEX, Layout.WINDOW


class Skip(Exception):
    """This attention cannot be rewritten safely; the message says why."""


def ev(node) -> torch.Tensor | None:
    """The fake example value Dynamo recorded for a node (None for non-tensors)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def is_method(node, *names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_fn(node, *fns) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in fns


_CAT = (torch.cat, torch.concat, torch.concatenate)
_SYM_SIZE = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size, torch.ops.aten.size.default)


@dataclass
class KVSource:
    new: fx.Node  # the tokens written this call: [B, Hkv, Sn, D]
    mode: int
    base: fx.Node  # APPEND: the cat node; INDEX: the buffer written in place
    past: fx.Node | None = None  # APPEND: the cache's previous tensor
    write_pos: fx.Node | None = None  # INDEX: positions written
    writers: list[fx.Node] = field(default_factory=list)  # INDEX: the in-place writes
    col_slice: tuple | None = None  # (start, stop) along the sequence dim, as graph args (int, None or Node)
    n_rep: int = 1
    chain: list[fx.Node] = field(default_factory=list)  # nodes peeled between base and the attention input


def _full_slice(x) -> bool:
    return isinstance(x, slice) and x == slice(None, None, None)


def _seq_slice(index) -> tuple | None:
    """(start, stop) if ``index`` slices only the sequence dim (2) of a 4-D tensor, else None."""
    if not isinstance(index, tuple) or len(index) not in (3, 4):
        return None
    if not (_full_slice(index[0]) and _full_slice(index[1])) or (len(index) == 4 and not _full_slice(index[3])):
        return None
    s = index[2]
    if not isinstance(s, slice) or s.step not in (None, 1):
        return None
    return (s.start, s.stop)


def _repeat_kv(node) -> tuple[fx.Node, int] | None:
    """x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h*n, s, d) -> (x, n)."""
    if not (is_method(node, "reshape", "view") or is_fn(node, torch.reshape)):
        return None
    exp = node.args[0]
    if not is_method(exp, "expand"):
        return None
    item = exp.args[0]
    if not is_fn(item, operator.getitem):
        return None
    idx = item.args[1]
    if not (isinstance(idx, tuple) and len(idx) in (3, 5) and idx[2] is None
            and all(_full_slice(i) for i in idx[:2] + idx[3:])):
        return None
    src, out = ev(item.args[0]), ev(node)
    if src is None or out is None or src.dim() != 4 or out.dim() != 4 or out.shape[1] % src.shape[1]:
        return None
    return item.args[0], out.shape[1] // src.shape[1]


def peel(node: fx.Node) -> tuple[fx.Node, int, tuple | None, list[fx.Node]]:
    """Walk back from an attention's k/v input to the tensor the cache produced."""
    n_rep, col_slice, chain = 1, None, []
    while True:
        rep = _repeat_kv(node)
        if rep is not None:
            chain += [node, node.args[0], node.args[0].args[0]]
            node, n = rep
            n_rep *= n
            continue
        if is_method(node, "repeat_interleave") or is_fn(node, torch.repeat_interleave):
            reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
            if isinstance(reps, int) and dim in (1, -3):
                chain.append(node)
                node, n_rep = node.args[0], n_rep * reps
                continue
            raise Skip(f"repeat_interleave({reps!r}, dim={dim!r}) between the cache and the attention")
        if is_method(node, "contiguous", "clone") or is_fn(node, torch.clone):
            chain.append(node)
            node = node.args[0]
            continue
        if is_method(node, "to", "type", "float", "half", "bfloat16") and node.args:
            src, out = ev(node.args[0]), ev(node)
            if src is not None and out is not None and (src.dtype, src.device) == (out.dtype, out.device):
                chain.append(node)
                node = node.args[0]
                continue
            raise Skip(f"a dtype/device cast ({node.format_node()}) between the cache and the attention")
        if is_fn(node, operator.getitem):
            sl = _seq_slice(node.args[1])
            val = ev(node.args[0])
            if sl is not None and val is not None and val.dim() == 4:
                if col_slice is not None:
                    raise Skip("two slices of the cache along the sequence dim")
                chain.append(node)
                col_slice, node = sl, node.args[0]
                continue
        return node, n_rep, col_slice, chain


def _writers(base: fx.Node, before: fx.Node, order: dict[fx.Node, int]) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """In-place writes (node, pos, new) into ``base`` along dim 2 that run before ``before``."""
    out = []
    for u in base.users:
        if order.get(u, 1 << 60) >= order[before]:
            continue
        if is_method(u, "index_copy_") and u.args[0] is base:
            dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
            if dim not in (2, -2):
                raise Skip(f"index_copy_ into the cache along dim {dim!r}, expected the sequence dim 2")
            out.append((u, u.args[2], u.args[3]))
        elif is_fn(u, operator.setitem) and u.args[0] is base:
            idx = u.args[1]
            if (isinstance(idx, tuple) and len(idx) in (3, 4) and _full_slice(idx[0]) and _full_slice(idx[1])
                    and isinstance(idx[2], fx.Node) and (len(idx) == 3 or _full_slice(idx[3]))):
                out.append((u, idx[2], u.args[2]))
            else:
                raise Skip(f"an in-place write into the cache with an unsupported index: {u.format_node()}")
        elif is_method(u, "index_put_", "copy_", "fill_", "zero_", "scatter_") or is_fn(u, torch.index_put):
            raise Skip(f"an in-place write into the cache that specache cannot follow: {u.format_node()}")
    return out


def resolve(node: fx.Node, attention: fx.Node, order: dict[fx.Node, int]) -> KVSource:
    """The KV source of one attention input (k or v)."""
    base, n_rep, col_slice, chain = peel(node)
    if is_fn(base, *_CAT):
        tensors = base.args[0] if base.args else base.kwargs.get("tensors")
        dim = base.args[1] if len(base.args) > 1 else base.kwargs.get("dim", 0)
        if not (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and dim in (2, -2)):
            raise Skip(f"a cat that is not [past, new] along the sequence dim: {base.format_node()}")
        past, new = tensors
        pv, nv = ev(past), ev(new)
        if nv is None or nv.dim() != 4 or pv is None or not (pv.dim() == 4 or (pv.dim() == 1 and pv.numel() == 0)):
            raise Skip(f"a cat whose operands are not 4-D KV tensors: {base.format_node()}")
        # a cat whose result the cache keeps as a tail slice (DynamicSlidingWindowLayer): the runtime must not take a
        # past shorter than its store for a crop
        tail = any(is_fn(u, operator.getitem) and _seq_slice(u.args[1]) is not None and u not in chain
                   for u in base.users)
        return KVSource(new=new, mode=WINDOW if tail else APPEND, base=base, past=past, col_slice=col_slice,
                        n_rep=n_rep, chain=chain)
    writes = _writers(base, attention, order)
    if not writes:
        raise Skip("no KV-cache write feeds this attention (no torch.cat([past, new]) or in-place write into a "
                   "buffer): there is nothing to offload")
    if len(writes) > 1:
        raise Skip(f"{len(writes)} in-place writes into the same cache buffer before one attention")
    w, pos, new = writes[0]
    bv, nv = ev(base), ev(new)
    if bv is None or bv.dim() != 4 or nv is None or nv.dim() != 4:
        raise Skip(f"an in-place cache write whose tensors are not 4-D: {w.format_node()}")
    return KVSource(new=new, mode=INDEX, base=base, write_pos=pos, writers=[w], col_slice=col_slice, n_rep=n_rep,
                    chain=chain)


def check_pair(k: KVSource, v: KVSource) -> None:
    if k.mode != v.mode:
        raise Skip("keys and values are cached differently")
    if k.col_slice != v.col_slice or k.n_rep != v.n_rep:
        raise Skip("keys and values are sliced or repeated differently")
    if k.mode == INDEX and k.write_pos is not v.write_pos:
        raise Skip("keys and values are written at different positions")
    kv, vv = ev(k.new), ev(v.new)
    if kv.shape[:3] != vv.shape[:3]:
        raise Skip(f"new keys {tuple(kv.shape)} and values {tuple(vv.shape)} disagree")
    if k.base is v.base:
        raise Skip("keys and values come from the same tensor")


def shape_only_users(node: fx.Node, allowed: set[fx.Node]) -> list[fx.Node]:
    """Users of ``node`` outside ``allowed`` that read its data (not just its shape or as a graph output).

    The cache tensor is replaced by a zero-stride placeholder after the rewrite, so anything that reads its values,
    other than the attention being rewritten, would silently see zeros: such a site must be left alone.
    """
    bad = []
    for u in node.users:
        if u in allowed or u.op == "output" or is_fn(u, *_SYM_SIZE) or is_method(u, "size", "dim"):
            continue
        if is_fn(u, operator.getitem) and _seq_slice(u.args[1]) is not None:
            bad += shape_only_users(u, allowed)  # a view (sliding-window tail kept as the cache): check its users
            continue
        bad.append(u)
    return bad
