"""The low-bit score and decode kernels on shapes drawn by hypothesis, held to the float64 oracles and the house rule
of tests/kernels/test_triton_attn.py: lengths of 1-8 key groups (16-512 tokens) under Triton's interpreter on CPU and
up to 5000 tokens on the GPU, head dims 64, 80 (decode) and 128, GQA groups 1-8, batch 1-5, 1-4 KV heads, bits 1/2/4,
fp32/bf16/fp16, biases with masked columns, start offsets inside the copy.

CPU: the draws and kernel runs happen in a child process (TRITON_INTERPRET=1, see tests/kernels/interpreted.py); the
draws are derandomized, so every run checks the same cases. The checks run here.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from interpreted import run_interpreted  # noqa: E402
from numerics import norm_err  # noqa: E402
from test_triton_attn import (  # noqa: E402
    DT,
    _assert_house_rule,
    _decode_inputs,
    _got,
    _score_inputs,
    _scores_eager,
    _scores_oracle,
    _verify_decode,
)

from specache_compile.kernels import attn_ops as ao  # noqa: E402
from specache_compile.kernels import reference as ref  # noqa: E402

pytestmark = pytest.mark.xdist_group("interpreted_fuzz")
CPU_EXAMPLES = 12  # each draw runs two kernels under the interpreter (about a second each at these sizes)


def _shapes(draw, max_groups: int, decode: bool):
    bits = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([16, 32, 64]))
    d = draw(st.sampled_from([64, 80, 128] if decode else [64, 128]))
    if d % group and decode:
        group = 16
    return dict(b=draw(st.integers(1, 5)), hkv=draw(st.integers(1, 4)), rep=draw(st.sampled_from([1, 2, 4, 8])),
                sq=draw(st.integers(1, 2)), d=d, nq=group * draw(st.integers(1, max_groups)), group=group, bits=bits,
                dtype=draw(st.sampled_from(["fp32", "bf16", "fp16"])), seed=draw(st.integers(0, 2**16)))


def _score_case(s):
    return _score_inputs(s["b"], s["hkv"], s["rep"], s["sq"], s["d"], s["nq"], s["group"], s["bits"], DT[s["dtype"]],
                         s["seed"])


def _decode_case(s, n_fp, bias, lo_frac):
    lo = int(lo_frac * s["nq"])
    inputs, _ = _decode_inputs(s["b"], s["hkv"], s["rep"], s["sq"], s["d"], s["d"], s["nq"], s["group"], s["bits"],
                               DT[s["dtype"]], n_fp, s["seed"], lo=lo, bias=bias)
    return inputs


def _draw_cases(max_groups: int, examples: int, run):
    """Draw ``examples`` (shape, score case, decode case) triples and hand each to ``run``."""

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def each(data):
        s = _shapes(data.draw, max_groups, decode=False)
        sd = _shapes(data.draw, max_groups, decode=True)
        n_fp = data.draw(st.sampled_from([1, 17, 33]))
        bias = data.draw(st.sampled_from(["none", "heads", "full"]))
        lo_frac = data.draw(st.sampled_from([0.0, 0.0, 0.3]))
        run(s, sd, n_fp, bias, lo_frac)

    each()


def _run_interpreted(path: str, shard: int, shards: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    ao.wrap_triton = lambda kernel: kernel
    results = {"scores": {}, "decode": {}}
    count = [0]

    def run(s, sd, n_fp, bias, lo_frac):
        i = count[0]
        count[0] += 1
        if i % shards != shard:
            return
        key = f"{i}:{s}|{sd}|f{n_fp}-{bias}-lo{lo_frac}"
        try:
            args = _score_case(s)
            results["scores"][key] = (args, ao._lowbit_scores_triton(*args))
        except Exception as e:  # recorded: one failing draw must not hide the others
            results["scores"][key] = (None, f"{type(e).__name__}: {e}")
        try:
            inputs = _decode_case(sd, n_fp, bias, lo_frac)
            results["decode"][key] = (inputs, ao._lowbit_decode_attention_triton(**inputs))
        except Exception as e:
            results["decode"][key] = (None, f"{type(e).__name__}: {e}")

    _draw_cases(8, CPU_EXAMPLES, run)
    torch.save(results, path)


def _check_scores(args, got, ulp_floor: float = 0.0):
    """``ulp_floor``: relative error (norm_err) always allowed. On the GPU the float32 kernel sums in another order
    than the CPU's eager matmul; at a few dozen products eager errs below one ulp (7e-8 was seen), so 10x eager would
    ask for fewer than 10 ulps."""
    q = args[0]
    assert got.dtype == torch.float32 and got.shape == (*q.shape[:3], args[1].shape[2])
    oracle = _scores_oracle(*args)
    if ulp_floor and norm_err(got, oracle) <= ulp_floor:
        return
    _assert_house_rule(got, _scores_eager(*args), oracle, q.dtype, "kernel")
    _assert_house_rule(ref.lowbit_scores(*args), _scores_eager(*args), oracle, q.dtype, "reference")


@pytest.mark.slow  # the interpreted draws take about 30 s on 2 cores
def test_fuzzed_shapes_interpreted(tmp_path_factory):
    res = run_interpreted("test_fuzz_kernels", tmp_path_factory.mktemp("fuzz"), ("scores", "decode"))
    assert len(res["scores"]) == len(res["decode"]) == CPU_EXAMPLES, {k: len(v) for k, v in res.items()}
    for key, entry in res["scores"].items():
        args, got = _got(entry)
        try:
            _check_scores(args, got)
        except AssertionError as e:
            raise AssertionError(f"scores, draw {key}: {e}") from e
    for key, entry in res["decode"].items():
        inputs, got = _got(entry)
        try:
            _verify_decode(inputs, got)
        except AssertionError as e:
            raise AssertionError(f"decode, draw {key}: {e}") from e


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU)")
def test_fuzzed_shapes_on_the_gpu():
    """Up to 78 groups of 64 (5000 tokens): the kernels on CUDA tensors, checked on the CPU against the oracles."""

    def run(s, sd, n_fp, bias, lo_frac):
        args = _score_case(s)
        got = ao._lowbit_scores_triton(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args]).cpu()
        _check_scores(args, got, ulp_floor=32 * torch.finfo(torch.float32).eps)
        inputs = _decode_case(sd, n_fp, bias, lo_frac)
        cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        _verify_decode(inputs, ao._lowbit_decode_attention_triton(**cuda).cpu())

    _draw_cases(78, 40, run)
