"""The torch.compile backend registered as "specache".

``torch.compile(model, backend="specache", options={...})`` (registered through the ``torch_dynamo_backends`` entry
point in pyproject.toml, so no import of ours is needed first) and ``specache.compile(model)`` both land here, once
per traced graph: the attention pass rewrites the Dynamo graph, then the inner compiler (Inductor on CUDA) compiles
the result.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from .config import Config, Inner, checked, with_overrides
from .passes import rewrite
from .runtime import runtime as rt

log = logging.getLogger("specache")


def _params(example_inputs) -> list[torch.Tensor]:
    return [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]


def _inner(config: Config, example_inputs) -> str:
    if config.inner != Inner.AUTO:
        return config.inner.value
    on_cuda = any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)
    # Inductor's C++ codegen for CPU graphs costs minutes per graph on a small machine and buys little for the
    # memory-bound decode step; CUDA graphs get Inductor.
    return "inductor" if on_cuda else "eager"


def specache_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    *,
    runtime: rt.Runtime | None = None,
    config: Config | None = None,
):
    """Rewrite the attention of ``gm`` and compile it with the inner backend."""
    if runtime is None:
        options = dict(options or {})
        base = options.pop("config", config)
        config = checked(with_overrides(base, options))
        runtime = rt.for_params(_params(example_inputs), config)
    real = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs))

    def param_module(node: fx.Node) -> str | None:
        x = real.get(node)
        if not isinstance(x, torch.nn.Parameter):
            return None
        return runtime.param_modules.get(id(x)) or "attention"  # torch.compile path: no names (Runtime.owner_site)

    reports = rewrite(gm, runtime.handle, param_module, runtime.config.sliding_layers)
    for r in reports:
        runtime.graph_stats.setdefault(r.site, []).append(r)
    inner = _inner(runtime.config, example_inputs)
    log.debug("specache: %d attention site(s) in graph, inner compiler %s", len(reports), inner)
    if inner == "eager":
        compiled = gm.forward
    else:
        from torch._dynamo.backends.registry import lookup_backend

        compiled = lookup_backend(inner)(gm, example_inputs)

    def run(*args):
        # holds the runtime alive as long as this compiled graph is: the op only carries its integer handle
        _ = runtime
        return compiled(*args)

    return run
