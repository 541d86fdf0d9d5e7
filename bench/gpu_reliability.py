"""GPU check of the cache-following path: generation modes on CUDA (Inductor as the inner compiler) equal the
unmodified model, under policy full and specache with a covering top-k. Prints one line per mode."""

import sys

import torch

sys.path.insert(0, "tests")
from hf_models import build, twin  # noqa: E402

import specache  # noqa: E402


@torch.no_grad()
def main():
    ids = torch.randint(2, 128, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    lookup = torch.randint(2, 128, (1, 8), generator=torch.Generator().manual_seed(2)).repeat(1, 3).cuda()
    ok = True
    for policy, kw in (("full", {}), ("specache", dict(topk=4096, window=4, group_size=16))):
        ref = build("llama", seed=0).cuda()
        m = specache.compile(twin(ref), policy=policy, **kw)
        for name, x, gen in (("greedy", ids, {}), ("beam", ids, dict(num_beams=3, num_return_sequences=3)),
                             ("prompt_lookup", lookup, dict(prompt_lookup_num_tokens=3))):
            a = ref.generate(x, max_new_tokens=10, do_sample=False, **gen)
            b = m.generate(x, max_new_tokens=10, do_sample=False, **gen)
            same = torch.equal(a, b)
            ok &= same
            rewrites = sum(s["rewrites"] for s in specache.stats(m)["store"].values())
            print(f"{policy:9s} {name:14s} equal={same} rewrites={rewrites}", flush=True)
    print("ALL EQUAL" if ok else "MISMATCH")


if __name__ == "__main__":
    main()
