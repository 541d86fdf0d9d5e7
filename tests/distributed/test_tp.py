"""specache on a tensor-parallel model: the gpt-fast module sharded with torch.distributed.tensor.parallel over two
CPU processes (gloo), as PyTorch's TP tutorial and gpt-fast's tp.py shard it: the fused q/k/v projection and the MLP's
first linear column-wise, the output projection and the MLP's second linear row-wise. Each rank then holds half the
query heads and half the KV heads, and its attention sees only those: specache's store on a rank must hold that
rank's KV heads and nothing else, and the sharded compiled model must give the unsharded model's logits.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import specache` uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tolerance table
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))  # test_modules: the gpt-fast module
from numerics import FP32_REL, rel_err  # noqa: E402
from test_modules import FastTransformer, KVCache, _tokens, run_fast  # noqa: E402

import specache  # noqa: E402

WORLD = 2
HEADS, HEAD_DIM, LAYERS, BATCH = (8, 2), 16, 2, 2
PREFILL, STEPS = 12, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(model: FastTransformer, mesh) -> FastTransformer:
    """gpt-fast's tp.py for this module: the equivalent of its weight_splits for the fused wqkv, local head counts
    in the attention (the module derives its views from them), and a KV cache of the local KV heads."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = mesh.size()
    for layer in model.layers:
        a = layer.attention
        d = a.head_dim
        # ColwiseParallel gives rank r the r-th contiguous block of rows; the fused weight is [q | k | v], so its
        # rows are regrouped into [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] first, else a rank would get query rows only
        q, k, v = a.wqkv.weight.data.split([a.n_head * d, a.n_kv * d, a.n_kv * d])
        blocks = [torch.cat([t.chunk(world)[r] for t in (q, k, v)]) for r in range(world)]
        a.wqkv.weight = torch.nn.Parameter(torch.cat(blocks))
        a.n_head, a.n_kv = a.n_head // world, a.n_kv // world
        batch, _, max_len, _ = a.kv_cache.k_cache.shape
        a.kv_cache = KVCache(batch, a.n_kv, max_len, d)
        parallelize_module(layer, mesh, {
            "attention.wqkv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
            "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(),
        })
    return model


@torch.no_grad()
def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a shared 2-core box
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        toks = _tokens(PREFILL + STEPS, batch=BATCH)
        want = None
        host_unsharded = None
        for policy, options in (("full", {}), ("specache", {"topk": PREFILL + STEPS})):
            torch._dynamo.reset()
            torch.manual_seed(0)  # the same weights on every rank
            base = FastTransformer(*HEADS, head_dim=HEAD_DIM, layers=LAYERS, batch=BATCH).eval()
            if want is None:
                want = list(run_fast(copy.deepcopy(base), toks, PREFILL, STEPS))
                unsharded = specache.compile(copy.deepcopy(base), policy="full")
                list(run_fast(unsharded, toks, PREFILL, STEPS))
                host_unsharded = specache.stats(unsharded)["bytes"]["host"]
            model = specache.compile(shard(base, mesh), policy=policy, **options)
            got = list(run_fast(model, toks, PREFILL, STEPS))

            errs = [rel_err(g, w) for g, w in zip(got, want)]
            assert max(errs) <= FP32_REL, (rank, policy, errs)
            assert all(torch.equal(g.argmax(-1), w.argmax(-1)) for g, w in zip(got, want)), (rank, policy)

            st = specache.stats(model)
            assert st["rewritten"] == st["found"] == LAYERS, (rank, policy, st["sites"])
            assert all(s["decode_steps"] == STEPS for s in st["store"].values()), (rank, policy, st["store"])
            sites = specache.runtime_of(model).sites
            assert len(sites) == LAYERS, (rank, list(sites))
            assert all(s.heads == HEADS[1] // WORLD for s in sites.values()), (rank, [s.heads for s in sites.values()])
            if policy == "full":
                assert st["bytes"]["host"] * WORLD == host_unsharded, (rank, st["bytes"], host_unsharded)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp_two_ranks_match_unsharded():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
