"""One attention site's KV: the full-precision store (host memory by default) and the policy's device tier.

Bytes are reported per tier so tests and benchmarks can check where they live: ``host`` is the full KV, ``device``
is whatever the policy keeps next to the model (low-bit copy, window, sinks, fetch buffers). On a CPU-only machine
both tiers are host memory; the split is the same.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels import ops
from .buffers import Growable
from .state import StaticDecodeState
from .streams import Streams


@dataclass
class SiteStats:
    decode_steps: int = 0
    prefill_tokens: int = 0
    fetched_rows: int = 0  # full-precision KV rows brought from the store to the device, summed over KV heads
    fetched_bytes: int = 0
    err_sum: float = 0.0  # relative error of the policy's attention output against exact attention (measure_error)
    err_max: float = 0.0
    err_count: int = 0
    rewrites: int = 0  # crops, rewinds, reorders and copies of the model's cache the store followed


@dataclass
class Site:
    name: str
    batch: int
    heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    device: torch.device
    host_device: torch.device
    pin: bool
    home: str = "host"  # Config.kv_home: which tier the full KV counts toward
    capacity: int = 0
    keep_full: bool = True  # False: the policy never reads the full KV back (Policy.uses_store), nothing is stored
    streams: Streams = field(default_factory=Streams)  # the runtime's stream manager: side streams for prefetches
    # KVComp-coded host rows instead of the Growables (runtime/host_codec.py); the Growables then hold an exact copy
    # only when Config.measure_error needs one (not counted in tier_bytes)
    codec: Any = None
    tier: dict[str, Any] = field(default_factory=dict)
    # the policy's fixed-shape decode state (runtime/state.py), the only one of the policy's objects the runtime and
    # the graph replay read; None until the site's first static step and after a reset
    static: StaticDecodeState | None = None
    # the per-step values every layer's static step shares (policies/specache_static.StepShared), set by the runtime
    step_shared: Any = None
    stats: SiteStats = field(default_factory=SiteStats)
    # The last cache token (runtime.Runtime.token): the tensor the model's cache keeps views of instead of KV, earlier
    # tokens of this site with how many leading rows their caches still share with the store, the shortest length the
    # store was cut back to this sequence (what an unrecognised copy of a placeholder may rely on), and the buffer an
    # index-mode cache writes into.
    token: torch.Tensor | None = None
    serial: int = 0  # the sequence this site's store holds (Runtime._serial when it began)
    master: torch.Tensor | None = None  # what each token is cloned from: row ids, and a size carrying the serial
    retired: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    low_water: int = 1 << 62
    buffer_ptr: int = 0

    def __post_init__(self) -> None:
        prefix = (self.batch, self.heads)
        kw = {"pin": self.pin, "capacity": self.capacity if self.keep_full else 0}
        self.k = Growable(prefix, (self.head_dim,), self.dtype, self.host_device, **kw)
        self.v = Growable(prefix, (self.v_head_dim,), self.dtype, self.host_device, **kw)
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens this site has seen (stored or not)."""
        return self._length

    def matches(self, k_new: torch.Tensor, v_new: torch.Tensor) -> bool:
        b, h, _, d = k_new.shape
        return (b, h, d, v_new.shape[-1], k_new.dtype, k_new.device) == (
            self.batch, self.heads, self.head_dim, self.v_head_dim, self.dtype, self.device,
        )

    def write(self, start: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        # From the GPU to pinned memory: asynchronous, on the current stream (kernels/quant_ops.write_rows_to_host).
        if self.codec is not None:
            self.codec.write(start, k_new, v_new)
        if self.keep_full:
            self.k.write(start, k_new)
            self.v.write(start, v_new)
        self._length = max(self._length, start + k_new.shape[2])

    def clear_state(self) -> None:
        """Drop the policy's device state (a new sequence, or a rebuild from the store)."""
        self.tier.clear()
        self.static = None

    def count_static_steps(self, stored: int, speculating: bool, steps: int = 1) -> None:
        """Host-side counters of ``steps`` decode steps whose rows the static path wrote at device positions (the
        store's rows are already there): ``stored`` rows each, one decode step per stored row when speculating (as
        the dynamic path counts), else one per call."""
        self._length += stored * steps
        self.k.length = self.v.length = self._length
        self.stats.decode_steps += (stored if speculating else 1) * steps

    def select_batch(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (a reorder, repeat or selection of the sequences, as beam search does)."""
        for buf in (self.k, self.v):
            buf.select(rows)
        self.batch = int(rows.numel())

    def truncate(self, n: int) -> None:
        self.k.length = min(self.k.length, n)
        self.v.length = min(self.v.length, n)
        self._length = min(self._length, n)

    def _need_full(self) -> None:
        if not self.keep_full and self.codec is None:
            raise RuntimeError(
                f"specache: site {self.name}: the policy declared uses_store=False but read the full-precision store"
            )

    def fetch_range(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K, V of positions [lo, hi) on the model's device: [B, Hkv, hi-lo, D]."""
        self._need_full()
        if self.codec is not None:
            k, v = self.codec.fetch_range(lo, hi, self.dtype, self.device, self.batch, self.heads)
            self._count(k, v)
            return k, v
        k = self.k.read(lo, hi, self.device)
        v = self.v.read(lo, hi, self.device)
        self._count(k, v)
        return k, v

    def fetch(
        self,
        idx: torch.Tensor,
        out_k: torch.Tensor | None = None,
        out_v: torch.Tensor | None = None,
        *,
        keys: bool = True,
        values: bool = True,
        stream: torch.cuda.Stream | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rows idx [B, Hkv, K] of the store, full precision, on the model's device (into out_* when given).
        ``keys=False`` / ``values=False`` skip that half (KCache fetches values only) and return None for it.
        ``stream``: run the gathers there (the stream manager's side stream); the caller orders it."""
        self._need_full()
        n = idx.shape[-1]
        out_k = out_k[:, :, :n] if out_k is not None and out_k.shape[2] >= n else None
        out_v = out_v[:, :, :n] if out_v is not None and out_v.shape[2] >= n else None
        if self.codec is not None:  # compressed rows, decoded on the model's device: see runtime/host_codec.py
            k, v = self.codec.fetch(idx, self.dtype, self.device, keys, values, stream)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if out_k is not None and k is not None:
                    k = out_k.copy_(k)
                if out_v is not None and v is not None:
                    v = out_v.copy_(v)
            self._count(k, v)
            return k, v
        k = ops.gather_rows(self.k.view(), idx, out_k, self.device, stream) if keys else None
        v = ops.gather_rows(self.v.view(), idx, out_v, self.device, stream) if values else None
        self._count(k, v)
        return k, v

    def _count(self, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        x = k if k is not None else v
        self.stats.fetched_rows += x.shape[0] * x.shape[1] * x.shape[2]
        self.stats.fetched_bytes += sum(t.numel() * t.element_size() for t in (k, v) if t is not None)

    def tier_bytes(self) -> dict[str, int]:
        host = self.codec.nbytes if self.codec is not None else self.k.nbytes + self.v.nbytes
        dev = sum(_nbytes(x) for x in self.tier.values()) + (self.static.nbytes if self.static is not None else 0)
        if self.codec is not None:
            dev += self.codec.device_nbytes  # the codec's full-precision tail (< one group of rows)
        if self.home == "device":
            return {"host": 0, "device": host + dev}
        return {"host": host, "device": dev}


def _nbytes(x: Any) -> int:
    if isinstance(x, (Growable, StaticDecodeState)):
        return x.nbytes
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return 0
