"""The compiled model's one-token decode steps replayed as CUDA graphs, under any loop that calls it.

``specache.compile(model)`` wraps the module's compiled call in :class:`DecodeGraphs`. Why here and not in a
generation loop of ours: transformers' ``model.generate``, a hand-written forward loop and a gpt-fast-style module all
call that one function, and a call of the compiled model runs Dynamo's guards, the pass's graph and, per layer, the
runtime's Python (tens of milliseconds a step for an 8B-shaped model, several times its GPU time). Where the policy
decodes through fixed-shape state (``policy.static``: every shape fixed by the cache's capacity, every length a
device scalar, no host sync; policies/specache_static.py) a step launches the same kernels with the same arguments
each time, so it is captured once and replayed: the step then costs its GPU time plus the copies of its inputs.

Which calls are replayed, and why they are safe:

- **Key.** Every call is keyed by what decides the work it does: each tensor argument's shape, strides, dtype and
  device; every other argument's value (or identity for objects, such as the cache); grad/inference mode; the
  module's training flag; the serial (runtime/state.py) and prefetch-slot parity of every site's static state (a
  new sequence builds new state, so graphs never outlive their sequence).
- **Proof by an eager call.** A key is captured only after an eager call with that key ran as a plain static decode
  step at every site it reached, without building state (the first step after a prefill builds it) and leaving the
  key unchanged. The call after that is captured and replayed; every later one is replayed.
- **Checks before a replay.** The key again, room for the step in every site's state (``StaticDecodeState.fits``:
  else the eager call grows it), and the cache tensors of every cache argument (a StaticCache's layers):
  a beam-search ``reorder_cache`` or a copy replaces them, and the eager call then raises the store's
  ``CacheMismatch`` as it would without graphs. A write position that is not the next one (a cache rewound by hand)
  is flagged on the device by the captured step itself and raised by ``check_deferred`` (end of ``model.generate``,
  ``specache.stats``).
- **Fresh outputs.** The graph writes its outputs into the same memory every replay: a call returns clones, so a
  loop that keeps the logits of several steps keeps what each step computed.

Host-side counters (stored lengths, decode steps, fetched rows) advance per replay through
``StaticDecodeState.replayed`` (runtime/state.py), the same bookkeeping ``specache.generate(cuda_graph=True)`` uses.

Off with ``Config.cuda_graphs=False``; never on CPU, under ``measure_error`` (its exact attention reads the host) or
inside a capture already under way (``specache.generate(cuda_graph=True)`` captures its own speculative steps).
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from typing import Any

import torch

from .runtime.runtime import NORMAL

log = logging.getLogger("specache")

_SAFE_KEPT = 8  # keys proven safe and not yet captured: a loop whose shapes change every step proves nothing twice


class DecodeGraphs:
    """The compiled call of a specache-compiled module, with its one-token static decode steps replayed as CUDA
    graphs (see the module docstring). ``capture=False`` swaps the CUDA graph for a re-run of the call on the staged
    inputs: the CPU tests check the keys, the staging and the refusals with it."""

    def __init__(self, call, runtime, module: torch.nn.Module, capture: bool = True) -> None:
        self.call = call
        self.runtime = runtime
        self._module = weakref.ref(module)  # the module holds this object (its compiled call): no cycle back
        self.capture = capture
        self.graphs: dict[tuple, _Graph] = {}
        self._safe: OrderedDict[tuple, None] = OrderedDict()
        self.disabled = False  # a capture failed: no more graphs for this model
        self.captured = 0  # graphs captured
        self.replayed = 0  # calls served by a replay
        self.eager_steps = 0  # static decode steps that ran from Python (warm-up, or keys never proven)

    # -- the call -------------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any):
        if not self._eligible():
            return self.call(*args, **kwargs)
        key = self._key(args, kwargs)
        graph = self.graphs.get(key)
        if graph is not None and graph.still_valid(args, kwargs) and self._fits():
            self.replayed += 1
            return graph.replay(args, kwargs)
        if graph is None and key in self._safe:
            return self._capture(key, args, kwargs)
        return self._eager(key, args, kwargs)

    def _eligible(self) -> bool:
        rt = self.runtime
        if self.disabled or not (rt.config.cuda_graphs and rt.policy.static) or rt.config.measure_error or \
                rt.step_mode != NORMAL:
            return False
        if not torch.cuda.is_available():
            return not self.capture
        return not torch.cuda.is_current_stream_capturing()

    def _fits(self) -> bool:
        """Every site's static state has room for the next step (else the eager call grows it)."""
        return all(s.static.fits(s) for s in self.runtime.sites.values() if s.static is not None)

    def _eager(self, key: tuple, args, kwargs):
        rt = self.runtime
        calls, plain = rt.calls, rt.plain_static_steps
        out = self.call(*args, **kwargs)
        ran, static = rt.calls - calls, rt.plain_static_steps - plain
        if static:
            self.eager_steps += 1
        after = self._key(args, kwargs)
        if ran and ran == static and (after == key or after == _flipped(key)):
            # a plain static decode step at every site, which built no state (a prefetching one only moved every site
            # to its other slot): the next call of this key is captured
            self._safe[key] = None
            self._safe.move_to_end(key)
            while len(self._safe) > _SAFE_KEPT:
                self._safe.popitem(last=False)
        return out

    def _capture(self, key: tuple, args, kwargs):
        del self._safe[key]
        # one memory pool for every graph: taken from a graph still alive, because a pool whose graphs are all gone is
        # freed and its handle cannot start another capture
        pool = next(iter(self.graphs.values())).pool if self.graphs else None
        try:
            graph = _Graph(self, args, kwargs, pool)
        except Exception as e:
            self.disabled = True
            raise RuntimeError(
                "specache: capturing a decode step as a CUDA graph failed; the sequence's state is undefined (the "
                "capture ran the step's Python, not its kernels). Fix: specache.reset(model) and start the sequence "
                "again (later steps of this model run without graphs), or compile with cuda_graphs=False"
            ) from e
        seq = key[0]
        for k in [k for k in self.graphs if k[0] != seq]:  # graphs of an earlier sequence replay dead state
            del self.graphs[k]
        self.graphs[key] = graph
        self.captured += 1
        log.debug("specache: decode step captured as a CUDA graph (%d captured, %d replays so far)", self.captured,
                  self.replayed)
        return graph.first_output()

    # -- keys -----------------------------------------------------------------------------------------------------
    def _key(self, args, kwargs) -> tuple:
        rt = self.runtime
        sts = [(name, s.static) for name, s in rt.sites.items()]
        # the states (a new sequence, a grown state: new graphs) and, apart, their parities (a policy that prefetches
        # into alternating slots has a graph for each, both of one sequence)
        states = tuple((name, None if st is None else st.serial) for name, st in sts)
        parities = tuple(None if st is None else st.cur for _, st in sts)
        module = self._module()
        training = module is not None and module.training
        return (states, parities, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), training,
                tuple(_arg_key(a) for a in args), tuple((k, _arg_key(v)) for k, v in sorted(kwargs.items())))

    def stats(self) -> dict[str, int]:
        return {"captured": self.captured, "replayed": self.replayed, "eager_steps": self.eager_steps,
                "kept": len(self.graphs)}


def _flipped(key: tuple) -> tuple:
    """``key`` with every site's prefetch-slot parity flipped: what a step that prefetches for the next one leaves."""
    return (key[0], tuple(None if c is None else c ^ 1 for c in key[1]), *key[2:])


def _arg_key(x: Any):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(_arg_key(v) for v in x))
    if hasattr(x, "layers"):  # a transformers cache: by identity, its tensors checked before a replay
        return ("C", id(x))
    # anything else (a dict, a mask object) may carry tensors a replay would not stage: a key equal to no other, so
    # such a call always runs eagerly
    return ("U", object())


def _map_tensors(fn, x: Any):
    """``x`` with ``fn`` applied to every tensor in it (nested tuples and lists), in the order the key lists them."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(fn, v) for v in x)
    return x


def _tensors(args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments of a call, in the order the key lists them."""
    out: list[torch.Tensor] = []
    _map_tensors(out.append, (args, [v for _, v in sorted(kwargs.items())]))
    return out


def _cache_tensors(args, kwargs) -> tuple[int, ...]:
    """Addresses of the KV tensors every cache argument holds (objects with transformers' ``layers``): a reorder or a
    copy replaces them, and a replay would then read the old ones."""
    ptrs = []
    for x in (*args, *kwargs.values()):
        for layer in getattr(x, "layers", None) or ():
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    ptrs.append(t.data_ptr())
    return tuple(ptrs)


def _fresh(x: Any):
    """``x`` with every tensor the graph wrote cloned (a tensor, a tuple or list of them, a ModelOutput); other
    objects (the cache) as they are."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)) and not hasattr(x, "keys"):
        return type(x)(_fresh(v) for v in x)
    if isinstance(x, dict):
        return type(x)(**{k: _fresh(v) for k, v in x.items()})
    return x


class _Graph:
    """One captured decode step: the staged inputs it reads, the outputs it writes, and its replay."""

    def __init__(self, owner: DecodeGraphs, args, kwargs, pool) -> None:
        self.owner = owner
        rt = owner.runtime
        # the staged inputs: this call's tensors, copied; the graph reads these addresses on every replay
        self.inputs = [t.clone() for t in _tensors(args, kwargs)]
        it = iter(self.inputs)
        s_args, s_values = _map_tensors(lambda t: next(it), (args, [v for _, v in sorted(kwargs.items())]))
        s_kwargs = dict(zip(sorted(kwargs), s_values))
        self.cache_ptrs = _cache_tensors(args, kwargs)
        self.sites = [s for s in rt.sites.values() if s.static is not None]
        self.calls = 0
        if owner.capture:
            dev = self.inputs[0].device if self.inputs else torch.device("cuda")
            self.graph = torch.cuda.CUDAGraph()
            calls = rt.calls
            # NOTE: capturing runs the step's Python once (the runtime's host counters advance once) and records its
            # kernels without running them; the replay below runs them: together, one step
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = owner.call(*s_args, **s_kwargs)
                rt.streams.join(dev)  # a fetch issued on the side stream joins back before the capture ends
            self.pool = self.graph.pool()
            self.calls = rt.calls - calls
            self.graph.replay()
        else:
            self.pool = None
            self._rerun = lambda: owner.call(*s_args, **s_kwargs)
            self.out = self._rerun()

    def first_output(self):
        return _fresh(self.out)

    def still_valid(self, args, kwargs) -> bool:
        return _cache_tensors(args, kwargs) == self.cache_ptrs

    def replay(self, args, kwargs):
        for dst, src in zip(self.inputs, _tensors(args, kwargs)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        if not self.owner.capture:
            return _fresh(self._rerun())
        self.graph.replay()
        for site in self.sites:
            site.static.replayed(site, 1)
        rt = self.owner.runtime
        rt.calls += self.calls
        rt.plain_static_steps += self.calls
        return _fresh(self.out)
