"""How a model's cache lays out the keys an attention reads: shared by the pass (which finds it) and the runtime
(which follows it)."""

from __future__ import annotations

import enum


class Layout(enum.IntEnum):
    """How the model's cache lays out the keys the original attention read (found by the pass, passes/kv_source.py)."""

    APPEND = 0  # torch.cat([past, new], dim=-2): DynamicCache; past_len = base_len - new
    INDEX = 1  # buf.index_copy_(2, pos, new) / buf[:, :, pos] = new: StaticCache, gpt-fast; columns are positions
    WINDOW = 2  # APPEND whose result the cache keeps as a tail slice (DynamicSlidingWindowLayer): past <= stored
