"""specache.stats(model, distributed=True) over two gloo CPU ranks: each rank's bytes and their sums, the same on
every rank; without an initialized process group it refuses with the fix."""

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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny configs
from hf_models import build  # noqa: E402

import specache  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # different prompt lengths per rank (8, 16): the sum is over what each rank reports, not world_size x its own
        model = specache.compile(build("llama", "sdpa"), policy="full")
        model(torch.randint(2, 128, (1, 8 * (rank + 1))))
        st = specache.stats(model, distributed=True)
        mine = specache.memory(model)
        w = st["world"]
        assert (w["world_size"], w["rank"]) == (WORLD, rank), w
        assert w["per_rank"][rank] == mine, (w, mine)
        assert w["bytes"] == {k: sum(r[k] for r in w["per_rank"]) for k in ("host", "device")}, w
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, w["per_rank"])
        assert gathered[0] == gathered[1], gathered  # every rank sees the same table
        assert "world" not in specache.stats(model)  # only when asked: it is a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_stats_world_sums_the_ranks():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_stats_distributed_without_process_group_says_the_fix(one_thread):
    model = specache.compile(build("llama", "sdpa"), policy="full")
    with torch.no_grad():
        model(torch.randint(2, 128, (1, 8)))
    with pytest.raises(ValueError, match="init_process_group"):
        specache.stats(model, distributed=True)
