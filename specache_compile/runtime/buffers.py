"""A buffer that grows along the sequence dim: [*prefix, capacity, *row].

Host buffers are pinned when asked (cudaHostAlloc is slow and synchronising: set ``Config.max_seq_len`` to allocate
once up front). Growth adds a quarter of the capacity (at least 64 rows), so appending one token per step costs
amortised O(1) copies while the allocation stays within 25% of what is used.
"""

from __future__ import annotations

import torch

from ..kernels import quant_ops


class Growable:
    def __init__(
        self,
        prefix: tuple[int, ...],
        row: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        pin: bool = False,
        capacity: int = 0,
    ) -> None:
        self.prefix, self.row, self.dtype, self.device, self.pin = tuple(prefix), tuple(row), dtype, device, pin
        self.length = 0
        self.data = self._alloc(capacity)
        # async device->host copies into pinned memory may be in flight (see _copy_in)
        self._inflight = False

    def _alloc(self, capacity: int) -> torch.Tensor:
        shape = (*self.prefix, capacity, *self.row)
        return torch.empty(shape, dtype=self.dtype, device=self.device, pin_memory=self.pin)

    @property
    def seq_dim(self) -> int:
        return len(self.prefix)

    def reserve(self, capacity: int) -> None:
        if capacity <= self.data.shape[self.seq_dim]:
            return
        old = self.data.shape[self.seq_dim]
        new = self._alloc(max(capacity, old + old // 4 + 64))
        if self.length:
            if self._inflight:
                # NOTE: a host sync, only when a pinned buffer grows: the CPU copy below must not read rows that a
                # device->host copy is still writing. Config.max_seq_len allocates once and never gets here.
                torch.cuda.synchronize()
                self._inflight = False
            new.narrow(self.seq_dim, 0, self.length).copy_(self.view())
        self.data = new

    def _copy_in(self, start: int, x: torch.Tensor) -> None:
        async_host = x.is_cuda and self.pin
        if async_host:
            # device -> pinned host without blocking the host: ordered on the current stream before every later
            # reader on it (and before the stream manager's side stream, which waits for it before a fetch).
            self._inflight = True
        if async_host and (len(self.prefix), len(self.row)) == (2, 1):
            # [B, H, S, D] (the store): not copy_ into the range view, which for B * H > 1 is not contiguous, so torch
            # would stage it through pageable memory and block the host until the GPU has drained (quant_ops)
            quant_ops.write_rows_to_host(x, self.data, start, pinned=True)
        else:
            self.data.narrow(self.seq_dim, start, x.shape[self.seq_dim]).copy_(x, non_blocking=async_host)

    def append(self, x: torch.Tensor) -> None:
        # x: [*prefix, n, *row]
        n = x.shape[self.seq_dim]
        self.reserve(self.length + n)
        self._copy_in(self.length, x)
        self.length += n

    def write(self, start: int, x: torch.Tensor) -> None:
        """Write x at [start, start + n); start <= length (no holes)."""
        assert start <= self.length, (start, self.length)
        n = x.shape[self.seq_dim]
        self.reserve(start + n)
        self._copy_in(start, x)
        self.length = max(self.length, start + n)

    def view(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        hi = self.length if hi is None else hi
        assert 0 <= lo <= hi <= self.length, (lo, hi, self.length)
        return self.data.narrow(self.seq_dim, lo, hi - lo)

    def read(self, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """Rows [lo, hi) on ``device``, a new tensor (or the view itself on the buffer's device); from pinned memory
        to CUDA asynchronously, on the current stream."""
        return quant_ops.read_rows_from_host(self.view(lo, hi), device, pinned=self.pin)

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` of the first prefix dim (the batch), in that order."""
        if self._inflight:
            # NOTE: a host sync: the gather below reads rows a device->host copy may still be writing. Only when the
            # sequences are reordered (beam search), never on a plain decode step.
            torch.cuda.synchronize()
            self._inflight = False
        rows = rows.to(self.data.device)
        self.prefix = (int(rows.numel()), *self.prefix[1:])
        new = self._alloc(self.data.shape[self.seq_dim])
        torch.index_select(self.data, 0, rows, out=new)
        self.data = new

    def clear(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the rows in use): what the memory tier really holds."""
        return self.data.numel() * self.data.element_size()
