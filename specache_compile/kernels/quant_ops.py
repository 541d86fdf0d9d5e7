"""Ops that make and read the low-bit KV copy (KIVI layout), and move rows between memories.

Each op: a pure-torch reference (reference.py) for every device until a Triton kernel registers for CUDA, and a fake.
"""

from __future__ import annotations

import torch

from . import reference as ref

# -- quantize --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("specache::quantize_keys", mutates_args=())
def quantize_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ref.quantize_keys(k, bits, group)


@quantize_keys.register_fake
def _(k, bits, group):
    b, h, s, d = k.shape
    return (k.new_empty((b, h, s, d * bits // 8), dtype=torch.uint8), k.new_empty((b, h, s // group, d)),
            k.new_empty((b, h, s // group, d)))


@torch.library.custom_op("specache::quantize_values", mutates_args=())
def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ref.quantize_values(v, bits, group)


@quantize_values.register_fake
def _(v, bits, group):
    b, h, s, d = v.shape
    g = min(group, d)
    return (v.new_empty((b, h, s, d * bits // 8), dtype=torch.uint8), v.new_empty((b, h, s, d // g)),
            v.new_empty((b, h, s, d // g)))


@torch.library.custom_op("specache::dequantize_keys", mutates_args=())
def dequantize_keys(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    return ref.dequantize_keys(packed, scale, zero, bits, group, dtype)


@dequantize_keys.register_fake
def _(packed, scale, zero, bits, group, dtype):
    b, h, s, p = packed.shape
    return packed.new_empty((b, h, s, p * 8 // bits), dtype=dtype)


@torch.library.custom_op("specache::dequantize_values", mutates_args=())
def dequantize_values(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    return ref.dequantize_values(packed, scale, zero, bits, group, dtype)


@dequantize_values.register_fake
def _(packed, scale, zero, bits, group, dtype):
    b, h, s, p = packed.shape
    return packed.new_empty((b, h, s, p * 8 // bits), dtype=dtype)



def gather_rows(
    src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Rows idx [B, H, K] of src [B, H, S, D] (host or device) on ``device``: [B, H, K, D].

    Not a torch.library op: it moves data between memories and runs only inside the runtime, never in a graph.
    """
    if out is None and device is not None and torch.device(device) != src.device:
        out = torch.empty((*idx.shape, src.shape[-1]), dtype=src.dtype, device=device)
    return ref.gather_rows(src, idx, out)
