"""On the lent GPU only: the compiled model on CUDA with Inductor, pinned host store."""

import pytest
import torch
from hf_models import build, twin

import specache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("policy", ["full", "specache"])
def test_cuda_inductor_generate_matches(policy):
    model = build("llama", "sdpa").cuda()
    ref = twin(model)
    ids = torch.randint(2, 128, (2, 40), device="cuda")
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=24, do_sample=False)
        specache.compile(model, policy=policy, topk=512, window=8, group_size=8, inner="inductor")
        got = model.generate(ids, max_new_tokens=24, do_sample=False)
    st = specache.stats(model)
    assert st["rewritten"] == st["found"] == 2
    assert all(s["decode_steps"] >= 23 for s in st["store"].values())
    assert torch.equal(got, want)
    site = next(iter(specache.runtime_of(model).sites.values()))
    assert site.k.data.device.type == "cpu" and site.k.data.is_pinned()
