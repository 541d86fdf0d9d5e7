"""The stream manager: fetches from the host store run on a side CUDA stream, into double-buffered device slots.

One ``Streams`` per runtime (one side stream per device). Per attention site, a ``Prefetch`` owns two device slots of
``rows`` K and V rows each and the bookkeeping of the fetch in flight:

    step t, layer l (main stream):  scores -> top-k of the speculative row = idx_{t+1}
                                    prefetch.issue(idx_{t+1})  -> side: wait main; gather rows into slot s'
                                    attention reads slot s (filled during step t-1), never slot s'
    step t+1, layer l:              prefetch.take()            -> main: wait the event of slot s'; read it

Ordering, and why each hazard is covered:

- NOTE (indices ready): ``side.wait_stream(main)`` before the gather: idx_{t+1} is produced on the main stream, and
  the host rows of the token written this step (an async device->host copy on main) must have landed.
- NOTE (write-after-read on the slot): slot s' was last read by step t-1's attention, enqueued on main before the
  ``wait_stream`` above, so the gather cannot overwrite it early. The slot in use this step (s) is never a target.
- NOTE (read-after-write): the consumer calls ``take()``, which makes main wait on the event recorded on the side
  stream after the gather.
- NOTE (lifetimes): the slots are allocated once per sequence and live on the site; idx is allocated on main and
  used on the side stream, so it is ``record_stream``ed there and also held until ``take()``.

On a machine without CUDA (or with the KV on the device and no side stream wanted) the same object runs the gather
inline on the current stream; the bookkeeping is identical, so CPU tests cover it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


class FetchTimer:
    """CUDA-event spans of the fetch work, for benchmarks (``Streams.timer``; off by default: events cost a few us).

    kinds: "prefetch" (a gather on the side stream), "wait" (the main stream stalled on a prefetch's event: the part
    of a prefetch that compute did not hide), "demand" (a fetch on the main stream, waited for in full). Exposed fetch
    time = wait + demand.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int]] = []

    @contextlib.contextmanager
    def span(self, kind: str, stream: torch.cuda.Stream | None, nbytes: int = 0):
        if stream is None:
            yield
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        yield
        b.record(stream)
        self.spans.append((kind, a, b, nbytes))

    def summary(self) -> dict[str, float]:
        """Milliseconds and bytes per kind (synchronises: call after the timed steps)."""
        torch.cuda.synchronize()
        out: dict[str, float] = {}
        for kind, a, b, n in self.spans:
            out[f"{kind}_ms"] = out.get(f"{kind}_ms", 0.0) + a.elapsed_time(b)
            out[f"{kind}_bytes"] = out.get(f"{kind}_bytes", 0) + n
            out[f"{kind}_count"] = out.get(f"{kind}_count", 0) + 1
        return out


class Streams:
    """The side stream per device (created lazily: importing or building a runtime never initialises CUDA)."""

    def __init__(self) -> None:
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self.timer: FetchTimer | None = None

    def span(self, kind: str, device: torch.device, stream: torch.cuda.Stream | None = None, nbytes: int = 0):
        """A timing span on ``stream`` (default: the current stream of ``device``), or a no-op when not timing."""
        if self.timer is None or device.type != "cuda":
            return contextlib.nullcontext()
        return self.timer.span(kind, stream or torch.cuda.current_stream(device), nbytes)

    def side(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        s = self._side.get(device)
        if s is None:
            s = self._side[device] = torch.cuda.Stream(device=device)
        return s

    def join(self, device: torch.device) -> None:
        """Make the current stream wait for everything issued on the side stream so far (a CUDA graph capture must end
        with every stream it forked joined back)."""
        s = self._side.get(device) if device.type == "cuda" else None
        if s is not None:
            torch.cuda.current_stream(device).wait_stream(s)


@dataclass
class PrefetchStats:
    issued: int = 0  # prefetches started
    consumed: int = 0  # prefetches a decode step used
    dropped: int = 0  # prefetches never used (a non-speculative step or a new sequence came first)


@dataclass
class Prefetch:
    """Double-buffered prefetch of full-precision rows for one site. See the module docstring for the protocol."""

    streams: Streams
    device: torch.device
    slots_k: torch.Tensor  # [2, B, Hkv, rows, D]
    slots_v: torch.Tensor  # [2, B, Hkv, rows, Dv]
    next_slot: int = 0  # the slot the next issue() fills
    pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None  # (slot, idx, event) in flight
    events: list = field(default_factory=list)  # one reusable event per slot (created on first use)
    stats: PrefetchStats = field(default_factory=PrefetchStats)

    @classmethod
    def allocate(cls, streams: Streams, b: int, h: int, rows: int, d: int, dv: int, dtype, device) -> Prefetch:
        return cls(
            streams,
            device,
            torch.empty((2, b, h, rows, d), dtype=dtype, device=device),
            torch.empty((2, b, h, rows, dv), dtype=dtype, device=device),
        )

    @property
    def rows(self) -> int:
        return self.slots_k.shape[3]

    def issue(self, site, idx: torch.Tensor) -> None:
        """Start fetching rows idx [B, Hkv, n <= rows] (absolute store positions) of ``site`` into the free slot."""
        if self.pending is not None:
            self.stats.dropped += 1  # a newer prediction replaces one nobody consumed
        slot = self.next_slot
        self.next_slot ^= 1
        n = idx.shape[-1]
        out_k, out_v = self.slots_k[slot, :, :, :n], self.slots_v[slot, :, :, :n]
        side = self.streams.side(self.device)
        event = None
        if side is None:
            site.fetch(idx, out_k, out_v)
        else:
            side.wait_stream(torch.cuda.current_stream(self.device))  # NOTE: indices and host writes ready
            idx.record_stream(side)  # NOTE: allocated on main, read on side
            nbytes = (out_k.numel() * out_k.element_size() + out_v.numel() * out_v.element_size())
            with self.streams.span("prefetch", self.device, side, nbytes):
                site.fetch(idx, out_k, out_v, stream=side)
            while len(self.events) <= slot:
                self.events.append(torch.cuda.Event())
            event = self.events[slot]
            event.record(side)
        self.pending = (slot, idx, event)
        self.stats.issued += 1

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The rows of the fetch in flight, once the main stream waits for them: (idx, k, v), or None."""
        if self.pending is None:
            return None
        slot, idx, event = self.pending
        self.pending = None
        if event is not None:
            with self.streams.span("wait", self.device):
                torch.cuda.current_stream(self.device).wait_event(event)  # NOTE: read-after-write across streams
        n = idx.shape[-1]
        self.stats.consumed += 1
        return idx, self.slots_k[slot, :, :, :n], self.slots_v[slot, :, :, :n]

    def cancel(self) -> None:
        """Drop the fetch in flight. NOTE: main still waits for it (no host sync): the slot it fills may be the
        buffer a later step reads, and a gather still writing there would race with that read."""
        if self.pending is not None:
            _, _, event = self.pending
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            self.stats.dropped += 1
            self.pending = None

    def free_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot no fetch in flight targets, for a synchronous (on-demand) fetch: [B, Hkv, rows, D] each."""
        self.cancel()
        return self.slots_k[self.next_slot], self.slots_v[self.next_slot]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slots_k, self.slots_v))


def overlap_count(real: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """How many positions of ``real`` [B, H, k] are also in ``predicted`` [B, H, k'] (per row, summed): a device
    scalar, no host sync. Both hold distinct positions per row."""
    return (real.unsqueeze(-1) == predicted.unsqueeze(-2)).any(-1).sum()


__all__ = ["FetchTimer", "Streams", "Prefetch", "PrefetchStats", "overlap_count"]
