"""The edges of the Python API a newcomer reaches first: compiling again after ``specache.reset``, ``backward()``
through a compiled model, ``topk=0``, and backend options checked when the backend is made, not at the first call."""

from __future__ import annotations

import pytest
import torch
from hf_models import build, twin
from torch import nn

import specache
from specache_compile import api


def _greedy(model, ids, n=3):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------------------------------
# reset, then compile again
# ----------------------------------------------------------------------------------------------------------------------


def test_reset_then_compile_again_runs_the_new_config(one_thread):
    model = build("llama")
    ref = twin(model)
    ids = torch.randint(2, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    want = _greedy(ref, ids)
    specache.compile(model, policy="full")
    assert _greedy(model, ids) == want
    first = specache.runtime_of(model)

    specache.reset(model)
    specache.compile(model, policy="specache", topk=32, window=4, group_size=16)
    second = specache.runtime_of(model)
    assert second is not first and second.config.policy == "specache"
    # a top-k covering the 24-27 tokens: the specache policy attends to every row, so the tokens are the model's
    assert _greedy(model, ids) == want
    assert second.calls > 0 and specache.stats(model)["rewritten"] == 2  # the new runtime served the second run
    assert specache.stats(model)["bytes"]["device"] > 0  # specache's low-bit tier (the full policy keeps none)


def test_compile_twice_without_reset_is_still_refused():
    model = nn.Linear(4, 4).eval()
    specache.compile(model, policy="full")
    specache.reset(model)
    specache.compile(model, policy="full")  # allowed once after a reset ...
    with pytest.raises(ValueError, match="already compiled by specache") as err:
        specache.compile(model, policy="full")  # ... and refused again until the next one
    assert "specache.reset(model)" in str(err.value)


def test_reset_keeps_the_model_compiled(one_thread):
    model = build("llama")
    ids = torch.randint(2, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    specache.compile(model, policy="full")
    first = _greedy(model, ids)
    runtime = specache.runtime_of(model)
    assert runtime.sites
    specache.reset(model)
    assert not runtime.sites  # the store is empty ...
    assert _greedy(model, ids) == first and runtime.sites  # ... and the same runtime serves the next sequence


# ----------------------------------------------------------------------------------------------------------------------
# training mode
# ----------------------------------------------------------------------------------------------------------------------


def test_backward_through_a_compiled_model_says_what_works(one_thread):
    model = build("llama").train()  # training mode, parameters that require grad: compiles, runs forward
    specache.compile(model, policy="full")
    out = model(torch.randint(2, 128, (1, 12)))
    assert specache.stats(model)["rewritten"] == 2  # attention_dropout 0: rewritten even in training mode
    with pytest.raises(RuntimeError, match="expected inference, got backward") as err:
        out.logits.sum().backward()
    msg = str(err.value)
    assert "torch.no_grad()" in msg and "model.eval()" in msg and "before specache.compile" in msg
    assert model.model.embed_tokens.weight.grad is None  # refused before any gradient reached a parameter


def test_no_grad_calls_are_left_as_they_are(one_thread):
    model = build("llama").train()
    ref = twin(model).eval()
    specache.compile(model.eval(), policy="full")
    ids = torch.randint(2, 128, (1, 12))
    with torch.no_grad():
        got = model(ids).logits
        want = ref(ids).logits
    assert not got.requires_grad and got._backward_hooks is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# topk
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk,match", [(0, "expected topk >= 1"), (-1, "expected an int >= 0")])
def test_topk_below_one_is_refused(topk, match):
    model = nn.Linear(4, 4).eval()
    with pytest.raises(ValueError, match=match) as err:
        specache.compile(model, topk=topk)
    assert f"{topk}" in str(err.value)
    assert getattr(model, "_specache_runtime", None) is None
    with pytest.raises(ValueError, match=match):
        api.backend(topk=topk)


def test_topk_zero_message_says_the_fix():
    with pytest.raises(ValueError) as err:
        specache.compile(nn.Linear(4, 4).eval(), policy="specache", topk=0)
    msg = str(err.value)
    assert "got topk=0" in msg and "fix:" in msg and "policy='quant'" in msg


# ----------------------------------------------------------------------------------------------------------------------
# backend options, checked when the backend is made
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,match", [
    ({"polcy": "full"}, "unknown option"),
    ({"policy": "nope"}, "Config.policy"),
    ({"bits": 3}, "Config.bits"),
    ({"policy": "kcache", "policy_options": {"topn": 8}}, "topn"),  # the policy's own check, run at creation
])
def test_backend_factory_validates_at_creation(options, match):
    with pytest.raises(ValueError, match=match):
        api.backend(**options)


def test_backend_factory_compiles_like_the_string(one_thread):
    model = build("llama")
    ref = twin(model)
    ids = torch.randint(2, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        got = torch.compile(model, backend=api.backend(policy="full"))(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    runtime = specache.runtime_of(model)
    assert runtime.config.policy == "full" and runtime.calls > 0  # specache's op served the attention


def test_backend_string_refuses_topk_zero_at_its_first_call():
    """torch.compile(backend="specache", options=...) hands the options over at the first call: refused there too
    (the policy would otherwise run with a top-k of 1)."""
    import torch
    from hf_models import build

    m = torch.compile(build("llama"), backend="specache", options={"topk": 0})
    with pytest.raises(Exception, match="expected topk >= 1"):
        m(torch.randint(0, 100, (1, 8)))
