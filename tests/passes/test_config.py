"""specache.Config validation, specache.compile's refusals, and the torch.compile backend entry.

Errors must name the field and the bad value (shared/STYLE.md: "expected, got, fix"), and a refused call must leave
the module as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import specache` uninstalled
import specache  # noqa: E402
from specache_compile.config import Inner, KVHome  # noqa: E402

# (override, the field the message must name, the value as the message must show it)
INVALID = [
    ({"bits": 3}, "bits", "3"),
    ({"bits": 0}, "bits", "0"),
    ({"topk": -1}, "topk", "-1"),
    ({"topk": True}, "topk", "True"),
    ({"window": 1.5}, "window", "1.5"),
    ({"sinks": -2}, "sinks", "-2"),
    ({"group_size": 3}, "group_size", "3"),
    ({"group_size": 0}, "group_size", "0"),
    ({"policy": "nope"}, "policy", "'nope'"),
    ({"kv_home": "gpu"}, "kv_home", "'gpu'"),
    ({"inner": "x"}, "inner", "'x'"),
    ({"max_seq_len": 0}, "max_seq_len", "0"),
    ({"speculative": 1}, "speculative", "1"),
    ({"measure_error": "yes"}, "measure_error", "'yes'"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A fresh Dynamo (no recompile limit carried over) and fresh specache counters (process-wide) per test."""
    torch._dynamo.reset()
    counters["specache"].clear()
    yield
    torch._dynamo.reset()


def _ids(cases):
    return [",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, *_ in cases]


@pytest.mark.parametrize(("override", "field", "shown"), INVALID, ids=_ids(INVALID))
def test_invalid_config_names_field_and_value(override, field, shown):
    with pytest.raises(ValueError) as err:
        specache.Config(**override)
    msg = str(err.value)
    assert f"Config.{field}" in msg and f"got {shown}" in msg, msg


@pytest.mark.parametrize(("override", "field", "shown"), INVALID, ids=_ids(INVALID))
def test_invalid_compile_override_leaves_module_untouched(override, field, shown):
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=field) as err:
        specache.compile(model, **override)
    assert f"got {shown}" in str(err.value)
    # refused before anything was attached: the module can still be compiled, once
    assert getattr(model, "_specache_runtime", None) is None
    assert specache.compile(model, policy="full") is model


def test_unknown_option_is_named():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"unknown option.*'topK'") as err:
        specache.compile(model, topK=8)
    assert "topk" in str(err.value)  # lists the valid names, so the typo is easy to see
    with pytest.raises(ValueError, match=r"unknown option.*'nope'"):
        specache.Config().replace(nope=1)
    with pytest.raises(ValueError, match=r"unknown option.*'nope'"):
        specache.specache_backend(None, [], options={"nope": 1})  # the backend validates its options the same way


@pytest.mark.parametrize("bits", [2.0, True])
def test_non_int_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        specache.Config(bits=bits)


def test_unhashable_policy_rejected_with_value_error():
    with pytest.raises(ValueError, match="policy"):
        specache.Config(policy=["full"])


def test_valid_overrides():
    base = specache.Config()
    c = specache.Config(policy="full", bits=4, group_size=32, topk=8, window=16, sinks=4, kv_home="device",
                        inner="aot_eager", max_seq_len=256, measure_error=True, policy_options={"a": 1})
    assert (c.policy, c.bits, c.group_size, c.topk, c.window, c.sinks) == ("full", 4, 32, 8, 16, 4)
    assert c.kv_home is KVHome.DEVICE and c.inner is Inner.AOT_EAGER  # str coerced to the enum
    assert (c.max_seq_len, c.measure_error, c.policy_options) == (256, True, {"a": 1})
    for bits in (1, 2, 4):
        assert specache.Config(bits=bits).bits == bits
    assert specache.Config(topk=0, window=0, sinks=0).topk == 0  # 0 is a legal size for each of these

    r = base.replace(topk=8)
    assert r.topk == 8 and base.topk == specache.Config().topk  # replace returns a copy
    assert dataclasses.replace(r, topk=base.topk) == base

    model = nn.Linear(4, 4)
    specache.compile(model, specache.Config(topk=8), window=16, policy="full")
    cfg = specache.runtime_of(model).config
    assert (cfg.policy, cfg.topk, cfg.window) == ("full", 8, 16)
    assert cfg == specache.Config(policy="full", topk=8, window=16)


def test_config_is_frozen():
    c = specache.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.topk = 8  # type: ignore[misc]
    assert c.topk == specache.Config().topk


def test_config_hashable_by_value_and_key_stable():
    a, b = specache.Config(topk=8, kv_home="device"), specache.Config(topk=8, kv_home=KVHome.DEVICE)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.key() == b.key() == a.key()
    assert isinstance(a.key(), str) and "'device'" in a.key()  # enum values, not their reprs
    assert dataclasses.replace(a, topk=9).key() != a.key()
    assert a != specache.Config(topk=9, kv_home="device")
    # every field is in the key, policy_options too, independent of dict order
    for f in dataclasses.fields(specache.Config):
        assert f"'{f.name}'" in a.key(), f.name
    p1 = specache.Config(policy_options={"x": 1, "y": 2})
    p2 = specache.Config(policy_options={"y": 2, "x": 1})
    p3 = specache.Config(policy_options={"x": 1, "y": 3})
    assert p1 == p2 and p1.key() == p2.key() and hash(p1) == hash(p2)
    assert p1 != p3 and p1.key() != p3.key()


# ----------------------------------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------------------------------


def test_compile_refuses_non_module():
    with pytest.raises(ValueError, match="expected a torch.nn.Module"):
        specache.compile(lambda x: x)


def test_compile_refuses_specache_compiled_module():
    model = nn.Linear(4, 4)
    specache.compile(model, policy="full")
    runtime = specache.runtime_of(model)
    with pytest.raises(ValueError, match="already compiled by specache") as err:
        specache.compile(model, policy="full")
    assert "fix" in str(err.value).lower()
    assert specache.runtime_of(model) is runtime  # the first compile's store is untouched


def test_compile_refuses_torch_compiled_module():
    opt = torch.compile(nn.Linear(4, 4), backend="eager")  # "eager": the refusal does not depend on the backend
    with pytest.raises(ValueError, match="torch.compile") as err:
        specache.compile(opt)
    msg = str(err.value)
    assert "fix" in msg.lower() and "backend='specache'" in msg
    assert getattr(opt._orig_mod, "_specache_runtime", None) is None


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile(model, backend=...)
# ----------------------------------------------------------------------------------------------------------------------


class CachedAttention(nn.Module):
    """One gpt-fast-style attention layer: preallocated cache buffers written in place, SDPA with a bool mask."""

    def __init__(self, dim=32, n_head=4, n_kv=2, max_len=64):
        super().__init__()
        self.n_head, self.n_kv, self.hd = n_head, n_kv, dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv) * self.hd, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, n_kv, max_len, self.hd))
        self.register_buffer("v_cache", torch.zeros(1, n_kv, max_len, self.hd))
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x, input_pos):
        b, s, dim = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(b, s, self.n_head, self.hd).transpose(1, 2)
        k = k.view(b, s, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(b, s, self.n_kv, self.hd).transpose(1, 2)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        k = self.k_cache.repeat_interleave(self.n_head // self.n_kv, dim=1)
        v = self.v_cache.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.causal[None, None, input_pos])
        return self.wo(y.transpose(1, 2).reshape(b, s, dim))


BACKENDS = {
    # name -> (backend factory, options for torch.compile, expected policy)
    "function-options": (
        lambda: functools.partial(specache.specache_backend, options={"policy": "full"}), None, "full"
    ),
    # topk >= the context: the specache policy is exact, through its low-bit tier (window and group small)
    "function-config": (
        lambda: functools.partial(
            specache.specache_backend, options={"config": specache.Config(topk=64, window=4, group_size=4)}
        ),
        None,
        "specache",
    ),
    "string": (lambda: "specache", {"policy": "full"}, "full"),
}
@pytest.mark.parametrize("form", list(BACKENDS))
@torch.no_grad()
def test_torch_compile_backend(form):
    factory, options, policy = BACKENDS[form]
    if form == "string" and "specache" not in torch._dynamo.list_backends():
        pytest.skip("the 'specache' backend string resolves only once the package is pip-installed (entry point)")
    torch.manual_seed(0)
    model = CachedAttention().eval()
    twin = copy.deepcopy(model)
    # a function backend gets its options through functools.partial: torch.compile forwards options= to strings only
    kwargs = {"options": options} if options else {}
    opt = torch.compile(model, backend=factory(), **kwargs)
    prefill, steps = 12, 6
    x = torch.randn(1, prefill + steps, 32)
    for lo, hi in [(0, prefill)] + [(p, p + 1) for p in range(prefill, prefill + steps)]:
        pos = torch.arange(lo, hi)
        a, b = opt(x[:, lo:hi], pos), twin(x[:, lo:hi], pos)
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5, (lo, hi)
    # the runtime is found through the model's parameters: the same store for every graph of the model
    st = specache.stats(model)
    assert st["policy"] == policy
    assert (st["found"], st["rewritten"], st["skipped"]) == (1, 1, 0), st["sites"]
    (site,) = st["store"].values()
    assert (site["prefill_tokens"], site["decode_steps"], site["length"]) == (prefill, steps, prefill + steps)
    assert counters["specache"]["attention_rewritten"] >= 2
