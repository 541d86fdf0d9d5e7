"""SpeCache's host copy stored with KVComp's codec (issue 6's second composition).

``policy="specache", policy_options={"host_codec": "kvcomp"}``: the full-precision K and V a site would keep in host
memory are kept instead as KVComp rows (kernels/kvcomp_ops.py ``compress_rows``: per (token, head) row an
error-bounded uniform quantization with its own scale and min, q = round(x/s) - round(min/s), |x - x_hat| <= s/2 with
s = (max - min) * rel, then canonical Huffman coding with a codebook built from the prefill's rows). The top-k rows
SpeCache fetches come back through ``gather_decompress``, which decodes only those rows.

What changes: host memory shrinks by the codec's ratio; the "full-precision" rows a step substitutes are within s/2
of the originals instead of exact (rel=0.02 by default: 1/50 of each row's range). Rows are compressed once a whole
offset group (``group`` rows, the payload's unit) has arrived; the last < group rows wait in full precision.

Limits, measured or not: the payload lives in CPU memory and compression runs on the CPU (a device->host copy and a
host sync per written token); on a GPU the gather decodes on the CPU and copies the rows over. Growth re-concatenates
the payload every ``group`` tokens (``append_rows``), O(N) each time. On the H100 at 32K (Llama-3-8B shape, 3da8322):
2.7 s a decode step against 175 ms for specache with the plain pinned store, 1.5 GiB of host KV against 4.0 GiB
(bench/results/decode.jsonl).
"""

from __future__ import annotations

import torch

from ..kernels import kvcomp_ops as kv


class _Rows:
    """One of K or V: a compressed prefix (whole groups) and a full-precision tail, on the CPU."""

    def __init__(self, rel: float, max_len: int) -> None:
        self.rel, self.max_len = rel, max_len
        self.payload: kv.RowPayload | None = None
        self.tail: torch.Tensor | None = None  # [B, H, n_tail, D] (CPU)
        self.length = 0

    def write(self, start: int, x: torch.Tensor) -> None:
        # x: [B, H, n, D] on any device; only appends (SpeCache never rewrites a position)
        if start != self.length:
            raise RuntimeError(f"specache host codec: expected a write at position {self.length} (append-only), got "
                               f"{start}; the compressed host store cannot rewrite or rewind")
        x = x.detach().to("cpu")
        rows = x if self.tail is None else torch.cat([self.tail, x], dim=2)
        g = kv.group_size(x.shape[3], kv.MAX_GROUP, self.max_len)
        whole = rows.shape[2] // g * g
        if whole:
            head = rows[:, :, :whole]
            self.payload = (kv.compress_rows(head, self.rel, self.max_len) if self.payload is None
                            else kv.append_rows(self.payload, head, self.rel))
        self.tail = rows[:, :, whole:].clone()
        self.length += x.shape[2]

    @property
    def n_compressed(self) -> int:
        return 0 if self.payload is None else self.payload.shape[2]

    def gather(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows idx [B, H, K] (absolute positions < length): [B, H, K, D] on the CPU."""
        idx = idx.to("cpu").long()
        nc = self.n_compressed
        out = None
        if nc:
            out = kv.gather_decompress(self.payload, idx.clamp(max=nc - 1)).to(dtype)
        if self.tail is not None and self.tail.shape[2]:
            t_idx = (idx - nc).clamp(0, self.tail.shape[2] - 1)
            t = torch.gather(self.tail, 2, t_idx.unsqueeze(-1).expand(-1, -1, -1, self.tail.shape[3])).to(dtype)
            out = t if out is None else torch.where((idx < nc).unsqueeze(-1), out, t)
        return out

    @property
    def nbytes(self) -> int:
        n = self.payload.nbytes if self.payload is not None else 0
        if self.tail is not None:
            n += self.tail.numel() * self.tail.element_size()
        return n


class KVCompHostStore:
    """The compressed stand-in for a Site's host K/V Growables (see runtime/store.py ``Site.codec``)."""

    def __init__(self, rel: float = 0.02, max_len: int = 10) -> None:
        if not (isinstance(rel, (int, float)) and 0 < rel <= 1) or kv.n_symbols(rel) > min(256, 2**max_len):
            raise ValueError(f"specache policy: policy_options['host_rel'] expected a float in (0, 1] giving at most "
                             f"{min(256, 2**max_len)} quantization levels (rel >= ~0.004), got {rel!r}")
        self.k = _Rows(rel, max_len)
        self.v = _Rows(rel, max_len)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.write(start, k)
        self.v.write(start, v)

    def fetch(self, idx: torch.Tensor, dtype: torch.dtype, device: torch.device, keys: bool, values: bool):
        k = self.k.gather(idx, dtype).to(device) if keys else None
        v = self.v.gather(idx, dtype).to(device) if values else None
        return k, v

    def fetch_range(self, lo: int, hi: int, dtype: torch.dtype, device: torch.device, b: int, h: int):
        idx = torch.arange(lo, hi).expand(b, h, hi - lo)
        return self.fetch(idx, dtype, device, True, True)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
