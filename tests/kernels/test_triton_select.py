"""select_topk (kernels/triton/select.py): softmax over [candidates, extra columns], mean over each GQA group, top-k.

CPU: the two kernels under Triton's interpreter in a child process (tests/kernels/interpreted.py), with small blocks
so the bitonic sort stays quick there; the set of positions must equal the reference's (random logits: no ties).
GPU (``gpu`` marker): Llama-3-8B shapes, 8K-128K columns."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from interpreted import run_interpreted  # noqa: E402

from specache_compile.kernels import attn_ops as ao  # noqa: E402

# -n 2 --dist loadgroup (README): every test of this module on one worker, so the interpreted run (a module
# fixture, in a child process) happens once rather than once per worker
pytestmark = pytest.mark.xdist_group("interpreted_select")
# slow: the `interpreted` fixture runs every case's kernels under Triton's interpreter in a child process
# (~10 s on 2 cores before the first of its tests); `-m slow` (CI) runs them, the GPU session runs the kernels
slow_interpreted = pytest.mark.slow

# id -> (B, Hq, rep, S, E, k): GQA groups 1/2/4, columns not a multiple of the block, masked columns, no extra
# columns, k equal to the block
CASES = {
    "gqa4": (1, 4, 4, 300, 5, 8),
    "batch2-no-extra": (2, 8, 4, 700, 0, 16),
    "mha-k-is-s": (1, 2, 1, 64, 3, 64),
    "gqa2-ragged": (1, 4, 2, 600, 7, 32),
}


def _inputs(b, hq, rep, s, e, k):
    g = torch.Generator().manual_seed(s + k)
    x = torch.randn(b, hq, s, generator=g) * 3
    x[..., ::7] = float("-inf")  # masked columns
    return x, torch.randn(b, hq, e, generator=g)


def _run_interpreted(path: str, shard: int, shards: int) -> None:
    ao._SELECT_BLOCK_N, ao._SELECT_COLS_PER_PART, ao._SELECT_BLOCK = 256, 256, 128  # small: the interpreter is slow
    # wrap_triton returns an interpreted kernel as is on torch >= 2.13 and raises on older torch; outside a trace it
    # only launches the kernel anyway
    ao.wrap_triton = lambda kernel: kernel
    res = {"select": {}}
    for i, (cid, case) in enumerate(CASES.items()):
        if i % shards == shard:
            x, ex = _inputs(*case)
            try:
                res["select"][cid] = ao.select_topk(x, ex, case[2], case[5])
            except Exception as e:  # recorded, so one failing case does not hide the others
                res["select"][cid] = f"{type(e).__name__}: {e}"
    torch.save(res, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted("test_triton_select", tmp_path_factory.mktemp("interpreted_select"), ("select",))


def _same_sets(got, want):
    assert got.shape == want.shape
    for row_g, row_w in zip(got.reshape(-1, got.shape[-1]).tolist(), want.reshape(-1, want.shape[-1]).tolist()):
        assert sorted(row_g) == sorted(row_w)


@slow_interpreted
@pytest.mark.parametrize("cid", list(CASES))
def test_select_topk_kernels_equal_the_reference(interpreted, cid):
    got = interpreted["select"][cid]
    if isinstance(got, str):
        raise AssertionError(f"the kernel raised {got}")
    x, ex = _inputs(*CASES[cid])
    _same_sets(got, ao.select_topk_reference(x, ex, CASES[cid][2], CASES[cid][5]))


def test_select_topk_on_cpu_is_the_reference():
    x, ex = _inputs(*CASES["gqa4"])
    assert torch.equal(ao.select_topk(x, ex, 4, 8), ao.select_topk_reference(x, ex, 4, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("s", [8192, 131072])
def test_gpu_select_topk_at_llama_shapes(s):
    g = torch.Generator(device="cuda").manual_seed(s)
    x = torch.randn(1, 32, s, device="cuda", generator=g) * 4
    ex = torch.randn(1, 32, 65, device="cuda", generator=g)
    _same_sets(ao.select_topk(x, ex, 4, 64).cpu(), ao.select_topk_reference(x, ex, 4, 64).cpu())


@pytest.mark.parametrize("k, s, want", [(64, 8192, 256), (64, 32768, 256), (64, 131072, 1024), (256, 32768, 1024),
                                        (256, 131072, 2048), (2048, 131072, 2048), (64, 100, 128), (8, 300, 256)])
def test_select_block_sizes(k, s, want):
    """Blocks of 4 k positions, at least 256, enough that the final top-k sees at most 8192 candidates per KV head,
    at most _SELECT_BLOCK_N and never more than the columns there are; never fewer than k (each block holds its k
    candidates)."""
    assert ao._select_block_n(k, s) == want
