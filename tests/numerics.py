"""The one tolerance table of the test suite (../shared/STYLE.md: three-way numerics)."""

import torch

# fp32: our result against the unmodified model's, max relative error.
FP32_REL = 1e-5
# low precision: our error against a float64 reference may be at most this times the eager model's error at the
# same dtype against the same reference.
LOWP_FACTOR = {torch.bfloat16: 1.1, torch.float16: 1.1}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: relative to the scale of b, so logits near zero do not blow it up."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the error measure for low-precision comparisons (a max-abs error is one sample and too noisy
    to compare two error realisations of the same precision)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
