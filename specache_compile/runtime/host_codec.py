"""SpeCache's host copy stored with KVComp's codec (issue 6's second composition).

``policy="specache", policy_options={"host_codec": "kvcomp"}``: the full-precision K and V a site would keep in host
memory are kept instead as KVComp rows (kernels/kvcomp_ops.py ``compress_rows``: per (token, head) row an
error-bounded uniform quantization with its own scale and min, q = round(x/s) - round(min/s), |x - x_hat| <= s/2 with
s = (max - min) * rel, then canonical Huffman coding with a codebook built from the prefill's rows). The top-k rows
SpeCache fetches come back through ``gather_decompress``, which decodes only those rows.

What changes: host memory shrinks by the codec's ratio; the "full-precision" rows a step substitutes are within s/2
of the originals instead of exact (rel=0.02 by default: 1/50 of each row's range). Rows are compressed once a whole
offset group (``group`` rows, the payload's unit) has arrived; the last < group rows wait in full precision.

Where things live and run (compressing and decoding on the CPU instead costs a host sync per written token, which
dominates a decode step at long contexts):
- Compression runs where the rows are written (the GPU in a CUDA run): ``compress_rows`` in torch, one host sync per
  compressed group of ``group`` tokens (the stream's new length), then asynchronous copies of the payload into pinned
  host buffers (``Growable``: words as one stream, per-row base / offset / scale / min as [N, B, H]).
- A fetch runs on the GPU with no host sync (``kvcomp_ops.gather_rows_into``): one kernel copies each requested row's
  compressed words straight from pinned host memory (read in place, only the compressed bytes cross the bus) into a
  device scratch, a second decodes them. On the stream the caller names (the speculative prefetch's side stream).
- The last < ``group`` rows (the tail) wait in full precision on the writer's device; they count as device bytes.
- A buffer that grows waits for the device first (``Growable.reserve``), so no kernel still reads the old one;
  a known capacity (``Config.max_seq_len``, or what ``specache.generate`` sets) sizes the per-row buffers once, and
  the word stream once at the first rows' bits per row (+2%); rows that code longer grow it by a quarter at a time.
On a CPU-only run the same buffers are plain CPU tensors and the fetch runs the reference decoder.

Step times and host bytes against plain specache: bench/results/decode.jsonl (rows ``specache-codec``), README Status.
"""

from __future__ import annotations

import torch

from ..kernels import kvcomp_ops as kv
from .buffers import Growable


class _Rows:
    """One of K or V: a compressed prefix (whole groups) in host buffers and a full-precision tail."""

    def __init__(self, rel: float, max_len: int, host: torch.device, pin: bool, capacity: int) -> None:
        self.rel, self.max_len, self.host, self.pin, self.capacity = rel, max_len, host, pin, capacity
        self.book: kv.Codebook | None = None
        self.tail: torch.Tensor | None = None  # [B, H, n_tail, D] on the writer's device
        self.length = 0  # rows written (compressed + tail)
        self.n_compressed = 0
        self.group = self.dim = 0
        self.words = self.base = self.rel16 = self.scale = self.min_int = None

    def _alloc(self, x: torch.Tensor) -> None:
        b, h, _, d = x.shape
        self.dim = d
        self.group = g = kv.group_size(d, kv.MAX_GROUP, self.max_len)
        cap = self.capacity

        def buf(dtype: torch.dtype, rows: int) -> Growable:
            return Growable((), (b, h), dtype, self.host, pin=self.pin, capacity=rows)

        self.words = Growable((), (), torch.int32, self.host, pin=self.pin)
        self.base = buf(torch.int32, -(-cap // g))
        self.rel16 = buf(torch.int16, cap)
        self.scale = buf(torch.float32, cap)
        self.min_int = buf(torch.int32, cap)

    def write(self, start: int, x: torch.Tensor) -> None:
        # x: [B, H, n, D] on any device; only appends (SpeCache never rewrites a position)
        if start != self.length:
            raise RuntimeError(f"specache host codec: expected a write at position {self.length} (append-only), got "
                               f"{start}; the compressed host store cannot rewrite or rewind")
        x = x.detach()
        if self.words is None:
            self._alloc(x)
        rows = x if self.tail is None else torch.cat([self.tail, x], dim=2)
        whole = rows.shape[2] // self.group * self.group
        if whole:
            # on the rows' device; one host sync (the stream's new length), then copies into the host buffers
            p = kv.compress_rows(rows[:, :, :whole], self.rel, self.max_len, self.book, self.words.length)
            if self.book is None and self.capacity > whole:
                # the stream's size at capacity, at the first rows' bits per row (+2%): one allocation, not growth by
                # a quarter at a time (which leaves up to 25% of the buffer unused)
                self.words.reserve(-(-p.words.numel() * self.capacity * 51 // (whole * 50)))
            self.book = p.book
            self.words.append(p.words)
            for buf, t in ((self.base, p.base), (self.rel16, p.rel), (self.scale, p.scale), (self.min_int, p.min_int)):
                buf.append(t.permute(2, 0, 1).contiguous())  # [n, B, H]: one contiguous block per append
            self.n_compressed += whole
        self.tail = rows[:, :, whole:].clone()
        self.length += x.shape[2]

    def gather(self, idx: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows idx [B, H, K] (absolute positions < length): [B, H, K, D] on ``device``."""
        b, h, k = idx.shape
        d = self.dim
        out = torch.empty((b, h, k, d), dtype=dtype, device=device)
        nc = self.n_compressed
        if nc:
            idx_d = idx.to(device, non_blocking=True)
            kv.gather_rows_into(out, idx_d.clamp(max=nc - 1), self.words.data, self.words.length,
                                self.base.view().permute(1, 2, 0), self.rel16.view().permute(1, 2, 0),
                                self.scale.view().permute(1, 2, 0), self.min_int.view().permute(1, 2, 0),
                                self.book.lut, self.group, self.max_len)
        if self.tail is not None and self.tail.shape[2]:
            t_idx = idx.to(self.tail.device, non_blocking=True)
            t_idx_c = (t_idx - nc).clamp(0, self.tail.shape[2] - 1)
            t = torch.gather(self.tail, 2, t_idx_c.unsqueeze(-1).expand(-1, -1, -1, d)).to(device, dtype)
            if nc:
                out = torch.where((t_idx < nc).to(device).unsqueeze(-1), out, t)
            else:
                out = t
        return out

    @property
    def host_nbytes(self) -> int:
        if self.words is None:
            return 0
        bufs = (self.words, self.base, self.rel16, self.scale, self.min_int)
        return sum(x.nbytes for x in bufs) + (self.book.nbytes if self.book is not None else 0)

    @property
    def tail_nbytes(self) -> int:
        return 0 if self.tail is None else self.tail.numel() * self.tail.element_size()


class KVCompHostStore:
    """The compressed stand-in for a Site's host K/V Growables (see runtime/store.py ``Site.codec``)."""

    def __init__(self, rel: float = 0.02, max_len: int = 10, host: torch.device | str = "cpu", pin: bool = False,
                 capacity: int = 0) -> None:
        if not (isinstance(rel, (int, float)) and 0 < rel <= 1) or kv.n_symbols(rel) > min(256, 2**max_len):
            raise ValueError(f"specache policy: policy_options['host_rel'] expected a float in (0, 1] giving at most "
                             f"{min(256, 2**max_len)} quantization levels (rel >= ~0.004), got {rel!r}")
        self.k = _Rows(rel, max_len, torch.device(host), pin, capacity)
        self.v = _Rows(rel, max_len, torch.device(host), pin, capacity)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.write(start, k)
        self.v.write(start, v)

    def fetch(self, idx: torch.Tensor, dtype: torch.dtype, device: torch.device, keys: bool, values: bool,
              stream: torch.cuda.Stream | None = None):
        """Rows idx [B, H, K] of K and/or V on ``device``; on ``stream`` when given (the caller orders it). The
        tails, which later writes replace, are marked as used there."""
        if stream is not None:
            for rows in (self.k, self.v):
                if rows.tail is not None and rows.tail.is_cuda:
                    rows.tail.record_stream(stream)
            with torch.cuda.stream(stream):
                return self.fetch(idx, dtype, device, keys, values)
        k = self.k.gather(idx, dtype, device) if keys else None
        v = self.v.gather(idx, dtype, device) if values else None
        return k, v

    def fetch_range(self, lo: int, hi: int, dtype: torch.dtype, device: torch.device, b: int, h: int):
        idx = torch.arange(lo, hi, device=device).expand(b, h, hi - lo)
        return self.fetch(idx, dtype, device, True, True)

    @property
    def nbytes(self) -> int:
        """Host bytes: the compressed rows' buffers (allocated capacity) and the codebooks."""
        return self.k.host_nbytes + self.v.host_nbytes

    @property
    def device_nbytes(self) -> int:
        """The full-precision tails (fewer than one group of rows each), on the writer's device."""
        return self.k.tail_nbytes + self.v.tail_nbytes
