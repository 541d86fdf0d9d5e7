"""bench/decode.py's profile-based fetch measure (what the decode rows report as exposed fetch for graph replays)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import fetch_overlap  # noqa: E402


def test_fetch_alone_is_exposed_and_overlapped_fetch_is_not():
    kernels = [
        ("attention", 0.0, 10.0),
        ("gather_rows_kernel", 5.0, 15.0),  # 5 us under the attention, 5 us alone
        ("mlp", 20.0, 30.0),
        ("gather_rows_kernel", 22.0, 28.0),  # entirely under the mlp
        ("Memcpy HtoD (Pinned -> Device)", 40.0, 43.0),  # alone
    ]
    got = fetch_overlap(kernels)
    assert got == {"fetch_busy_us": 10.0 + 6.0 + 3.0, "exposed_us": 5.0 + 0.0 + 3.0}


def test_overlapping_kernels_are_counted_once():
    # two fetches on two streams over one span, covered by two compute kernels that touch: no double counting
    kernels = [
        ("gather_rows_kernel", 0.0, 8.0),
        ("gather_rows_kernel", 2.0, 10.0),
        ("scores", 1.0, 4.0),
        ("select", 4.0, 6.0),
        ("attention", 5.0, 7.0),
    ]
    got = fetch_overlap(kernels)
    assert got["fetch_busy_us"] == pytest.approx(10.0)
    assert got["exposed_us"] == pytest.approx(10.0 - 6.0)  # compute covers [1, 7]


def test_no_fetch_and_no_compute():
    assert fetch_overlap([("mlp", 0.0, 4.0)]) == {"fetch_busy_us": 0, "exposed_us": 0}
    assert fetch_overlap([("gather_rows_kernel", 1.0, 4.0)]) == {"fetch_busy_us": 3.0, "exposed_us": 3.0}


def test_one_compute_kernel_covers_several_fetches():
    kernels = [("attention", 0.0, 100.0), ("gather_rows_kernel", 10.0, 20.0), ("gather_rows_kernel", 30.0, 40.0),
               ("gather_rows_kernel", 95.0, 110.0)]
    assert fetch_overlap(kernels) == {"fetch_busy_us": 35.0, "exposed_us": 10.0}
