"""specache on a transformers model loaded for tensor parallelism by transformers itself: a tiny LlamaForCausalLM
saved to a folder, loaded on two gloo CPU ranks with ``from_pretrained(..., distributed_config=DistributedConfig(
tp_size=2))`` (the model's own ``base_model_tp_plan``: q/k/v and the MLP's gate/up column-wise, o and down row-wise,
lm_head gathered). Each rank's attention sees its own query and KV heads; specache's store must hold exactly those,
and the compiled sharded model must give the unsharded model's logits and greedy tokens.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import specache` uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny configs, the tolerance table
from hf_models import build  # noqa: E402
from numerics import FP32_REL, rel_err  # noqa: E402

import specache  # noqa: E402

WORLD = 2
HEADS, KV_HEADS, LAYERS = 8, 4, 2
LENGTHS, STEPS = (14, 9), 6  # a left-padded batch: the mask path, not only is_causal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(0)
    s = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        ids[i, s - n:] = torch.randint(2, 128, (n,), generator=g)
        mask[i, s - n:] = 1
    return ids, mask


def _decode(model, ids, mask, toks=None):
    """Prefill then STEPS one-token steps (the given tokens fed when toks is not None); (logits per step, tokens)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    logits, fed = [out.logits[:, -1].float()], []
    for i in range(STEPS):
        tok = toks[i] if toks is not None else out.logits[:, -1].argmax(-1, keepdim=True)
        fed.append(tok)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return logits, fed


def _generate(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)


@torch.no_grad()
def _worker(rank: int, port: int, folder: str) -> None:
    # the variables torchrun sets: transformers' distributed loading reads RANK / LOCAL_RANK / WORLD_SIZE
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)  # two processes on a shared 2-core box
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        def load(tp: bool):
            kw = {"distributed_config": DistributedConfig(tp_size=WORLD)} if tp else {}
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                                        **kw).eval()

        ids, mask = _batch()
        ref = load(tp=False)
        want, toks = _decode(ref, ids, mask)
        want_ids = _generate(ref, ids, mask)
        unsharded = specache.compile(load(tp=False), policy="full")
        _decode(unsharded, ids, mask, toks)
        host_unsharded = specache.stats(unsharded)["bytes"]["host"]

        for policy, options in (("full", {}), ("specache", {"topk": max(LENGTHS) + STEPS + 1})):
            torch._dynamo.reset()
            model = load(tp=True)
            attn = model.model.layers[0].self_attn
            assert attn.q_proj.weight.to_local().shape[0] == HEADS // WORLD * attn.head_dim, attn.q_proj.weight
            specache.compile(model, policy=policy, **options)
            got, _ = _decode(model, ids, mask, toks)
            errs = [rel_err(g, w) for g, w in zip(got, want)]
            assert max(errs) <= FP32_REL, (rank, policy, errs)

            st = specache.stats(model)
            assert st["rewritten"] == st["found"] == LAYERS, (rank, policy, st["sites"])
            assert all(s["decode_steps"] == STEPS for s in st["store"].values()), (rank, policy, st["store"])
            sites = specache.runtime_of(model).sites
            assert len(sites) == LAYERS, (rank, list(sites))
            assert all(s.heads == KV_HEADS // WORLD for s in sites.values()), (rank, [s.heads for s in sites.values()])
            if policy == "full":
                assert st["bytes"]["host"] * WORLD == host_unsharded, (rank, st["bytes"], host_unsharded)
            # greedy generate() through the same compiled sharded model (a new sequence)
            assert torch.equal(_generate(model, ids, mask), want_ids), (rank, policy)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_transformers_tp_plan_two_ranks_match_unsharded(tmp_path):
    folder = tmp_path / "tiny-llama"
    build("llama", "sdpa", heads=HEADS, kv_heads=KV_HEADS, layers=LAYERS).save_pretrained(folder)
    mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
