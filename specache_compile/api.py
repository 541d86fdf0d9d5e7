"""The public face: ``specache.compile(model)`` and what reports on a compiled model."""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from .backend import specache_backend
from .config import Config, checked, with_overrides
from .policies import registered
from .runtime import runtime as rt

_ATTR = "_specache_runtime"
# set by reset(): the store is empty, so compiling the module again (another config) stores nothing twice; the new
# compile replaces the old runtime (its parameters, its compiled call and generate are rebound to the new one)
_RESET = "_specache_reset"
_GRAPHS = "_specache_graphs"  # the DecodeGraphs around the module's compiled call (decode_graphs.py)


def compile(model: torch.nn.Module, config: Config | None = None, **overrides: Any) -> torch.nn.Module:  # noqa: A001
    """Compile ``model`` with the specache backend; returns the same module, compiled in place.

    Every attention the pass can rewrite reads its KV from specache's store from then on: full precision in host
    memory, the policy's compressed copy on the device. ``config`` is a ``specache.Config``; keyword overrides
    replace its fields (``specache.compile(model, policy="full")``). Compilation happens on the first call, per input
    shape, like torch.compile. Works with ``model.generate``: transformers' own auto-compilation is turned off for
    this model (it would compile our compiled call again with Inductor).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"specache.compile: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            "specache.compile: expected an uncompiled module, got the result of torch.compile; "
            "fix: pass the original module, or use torch.compile(module, backend='specache') instead"
        )
    if getattr(model, _ATTR, None) is not None and not getattr(model, _RESET, False):
        raise ValueError(
            "specache.compile: this module is already compiled by specache (applying it twice would store the KV "
            "twice); fix: compile the original module once, or call specache.reset(model) first to drop its KV store "
            "and compile it again"
        )
    config = checked(with_overrides(config, overrides))
    # Every model compiled in a process adds graphs (prefill, decode, speculative steps) to the same transformers code
    # objects, and Dynamo's recompile limit is per code object: past it, the model would run without specache's
    # graph, over its placeholder cache. Room for a few dozen models (specache.generate refuses if it still happens).
    dyn = torch._dynamo.config
    dyn.recompile_limit = max(dyn.recompile_limit, 256)
    dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 4096)
    runtime = rt.Runtime(config)
    runtime.adopt(list(model.parameters()))
    runtime.param_modules.update({id(p): attention_module(n) for n, p in model.named_parameters()})
    setattr(model, _ATTR, runtime)
    setattr(model, _RESET, False)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "disable_compile"):
        gen.disable_compile = True
    model.compile(backend=functools.partial(specache_backend, runtime=runtime), dynamic=None)
    from .decode_graphs import DecodeGraphs

    graphs = DecodeGraphs(model._compiled_call_impl, runtime, model)
    setattr(model, _GRAPHS, graphs)
    model._compiled_call_impl = _inference_only(graphs)
    if callable(getattr(type(model), "generate", None)):
        # this instance only (transformers' class is not patched); a bound method, so a copy of the model binds its own
        model.generate = types.MethodType(_generate_checked, model)
    return model


def _inference_only(call):
    """``call`` (the module's compiled call), whose outputs refuse ``backward()`` with the fix. specache's KV ops have
    no backward; torch would fail inside them with "no autograd formula", far from the cause. A module in training
    mode still compiles and runs forward (dropout's attention is left alone); only a backward through it is refused."""

    def run(*args: Any, **kwargs: Any):
        out = call(*args, **kwargs)
        if torch.is_grad_enabled():  # generate, no_grad and inference_mode skip this
            for leaf in torch.utils._pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    leaf.register_hook(_refuse_backward)
        return out

    return run


def _refuse_backward(grad: torch.Tensor):
    raise RuntimeError(
        "specache: expected inference, got backward() through a model compiled by specache (its KV ops have no "
        "backward). Fix: generate under torch.no_grad() or torch.inference_mode() (model.eval() for dropout), and "
        "train the module before specache.compile"
    )


def backend(config: Config | None = None, **overrides: Any):
    """The specache backend with these options, validated now rather than at the first call:
    ``torch.compile(model, backend=specache_compile.api.backend(policy="kcache", topk=128))``.

    ``torch.compile(model, backend="specache", options={...})`` works too, but torch hands those options to the backend
    only when it compiles the first graph, so a bad one surfaces there, wrapped in ``BackendCompilerFailed``.
    """
    config = checked(with_overrides(config, overrides))
    registered()[config.policy].from_config(config)  # the policy's own options (policy_options) are checked here
    return functools.partial(specache_backend, config=config)


def _generate_checked(self, *args: Any, **kwargs: Any):
    """The model class's generate, given specache's cache where the call asks for it or the policy's default is it
    (cache.generate_kwargs), then the deferred checks: index-mode decode steps check their write positions on the
    device (no sync a step), and what they found is raised before the tokens they produced are returned."""
    from .cache import generate_kwargs
    from .generate import cache_keyword

    runtime = runtime_of(self)
    kwargs = generate_kwargs(self, args, kwargs, runtime.policy.static, cache_keyword(self))
    out = type(self).generate(self, *args, **kwargs)
    runtime.check_deferred()
    return out


def attention_module(param: str) -> str:
    """The module an attention's parameter names it by (site names where Dynamo recorded no module stack): the
    projection's parent, ``model.layers.0.self_attn`` for ``model.layers.0.self_attn.q_proj.weight``."""
    parts = param.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else param


def runtime_of(model: torch.nn.Module) -> rt.Runtime:
    runtime = getattr(model, _ATTR, None) or rt.by_params(list(model.parameters()))
    if runtime is None:
        raise ValueError(
            "specache: expected a model compiled by specache.compile or torch.compile(backend='specache') and run "
            "at least once; got a module specache has not seen. Fix: compile it and call it first."
        )
    return runtime


def stats(model: torch.nn.Module, distributed: bool = False, group: Any = None) -> dict[str, Any]:
    """How many attention sites the pass found, rewrote and left alone (with why), and the store's state per site.

    distributed=True (torch.distributed initialized; a collective, so every rank of ``group`` must call it) adds
    ``"world"``: {"world_size", "rank", "per_rank": [{"host", "device"}, ...], "bytes": {"host", "device"} summed}.

    {"found": n, "rewritten": n, "skipped": n, "partial": n,
     "sites": {name: {"status": "rewritten" | "skipped" | "partial", "kind", "mode", "reason", "graphs"}},
     "store": {name: {"length", "decode_steps", "fetched_rows", ..., "host", "device"}}, "bytes": {"host", "device"},
     "cuda_graphs": {"captured", "replayed", "eager_steps", "kept"} or None}
    """
    runtime = runtime_of(model)
    runtime.check_deferred()
    sites = {}
    for name, reports in runtime.graph_stats.items():
        statuses = {r.status for r in reports}
        # a site rewritten in one graph and left alone in another (e.g. prefill vs decode) is "partial": its store
        # misses what the unrewritten graph saw, and the runtime refuses to continue such a sequence
        status = statuses.pop() if len(statuses) == 1 else "partial"
        reasons = list(dict.fromkeys(r.reason for r in reports if r.status == "skipped"))
        mode = next((r.mode for r in reports if r.mode), "")
        sites[name] = {"status": status, "kind": reports[-1].kind, "mode": mode,
                       "reason": "; ".join(reasons), "graphs": len(reports)}
    return {
        "policy": runtime.config.policy,
        "found": len(sites),
        "rewritten": sum(s["status"] == "rewritten" for s in sites.values()),
        "skipped": sum(s["status"] == "skipped" for s in sites.values()),
        "partial": sum(s["status"] == "partial" for s in sites.values()),
        "sites": sites,
        "store": runtime.site_stats(),
        "bytes": runtime.tier_bytes(),
        # decode steps replayed as CUDA graphs (decode_graphs.py); absent for torch.compile(backend="specache")
        "cuda_graphs": graphs.stats() if (graphs := getattr(model, _GRAPHS, None)) is not None else None,
    } | ({"world": world_bytes(runtime.tier_bytes(), group)} if distributed else {})


def world_bytes(local: dict[str, int], group: Any = None) -> dict[str, Any]:
    """Every rank's {"host", "device"} bytes and their sums, by one all_gather of a [2] int64 tensor per rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "specache.stats(distributed=True): expected an initialized torch.distributed process group, got none; "
            "fix: call it after init_process_group (torchrun), or without distributed=True for this rank's bytes"
        )
    # NCCL moves only device tensors; gloo (and a "cpu:gloo,cuda:nccl" group) takes host ones
    backend = str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if "gloo" not in backend else torch.device("cpu")
    mine = torch.tensor([local["host"], local["device"]], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    per_rank = [{"host": int(t[0]), "device": int(t[1])} for t in parts]
    return {"world_size": len(parts), "rank": dist.get_rank(group), "per_rank": per_rank,
            "bytes": {k: sum(r[k] for r in per_rank) for k in ("host", "device")}}


def memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes specache holds for this model's KV, per tier: {"host": full KV, "device": the policy's device tier}."""
    return runtime_of(model).tier_bytes()


def attention_error(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per-site relative error ||o - o_exact|| / ||o_exact|| of the policy's decode attention output against exact
    attention over the same tokens, averaged over the decode steps of the current sequence (a new prefill starts the
    averages afresh). Needs ``measure_error=True``."""
    runtime = runtime_of(model)
    if not runtime.config.measure_error:
        raise ValueError(
            "specache.attention_error: expected a model compiled with measure_error=True, got measure_error=False; "
            "fix: specache.compile(model, measure_error=True, ...)"
        )
    out = {}
    for name, site in runtime.sites.items():
        st = site.stats
        if st.err_count:
            out[name] = {"mean": st.err_sum / st.err_count, "max": st.err_max, "steps": st.err_count}
    return out


def reset(model: torch.nn.Module) -> None:
    """Forget every stored token (the next call must start a new sequence). The model stays compiled; it may also be
    compiled again, with another config (``specache.compile(model, policy="full")``), which replaces this runtime."""
    runtime = runtime_of(model)
    runtime.sites.clear()
    graphs = getattr(model, _GRAPHS, None)
    if graphs is not None:
        graphs.graphs.clear()  # their memory: they replay the state of sequences that are gone
    setattr(model, _RESET, True)


def policies() -> list[str]:
    return sorted(registered())
