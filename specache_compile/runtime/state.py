"""The typed interface between the runtime and a policy's fixed-shape decode state (the static decode path).

A policy that declares ``static`` keeps, per site, one :class:`StaticDecodeState` under ``site.static``,
built at the site's first static decode step from what the prefill left. The runtime and the CUDA-graph replay
(decode_graphs.py) read only what this class declares, never the policy's own tensors:

- ``serial``: unique per state object, never reused: captured graphs are keyed by it (a new state, new graphs);
- ``cur``: which of the state's alternating buffers the next step reads (SpeCache's two prefetch slots); a captured
  step is keyed by it, so a state with one buffer set (``cur`` always 0) needs one graph per sequence;
- ``bad``: a device bool the state's steps raise when a write position was not the next one (no host read in a
  step: ``Runtime.check_deferred`` folds every site's flag in and raises); ``advance`` does it against ``n``, the
  tokens seen, for a state built with ``tokens``;
- ``replayed(site, steps)``: the host-side counters of steps a CUDA graph replayed without running Python;
- ``fits(site)``: the next step has room in the state's buffers (False: the step must run from Python, which grows
  them; a replay would write past them);
- ``tensors()``: the device tensors the state owns and nothing else names, counted in the site's device tier.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch

_SERIALS = itertools.count(1)


class StaticDecodeState:
    """Base class of a site's fixed-shape decode state (see the module docstring)."""

    def __init__(self, device: torch.device, tokens: int | None = None) -> None:
        # what graphs are keyed by: never reused, unlike id() (a state replaced twice before a capture could be
        # given the address of the first, and its graphs replayed over freed tensors)
        self.serial = next(_SERIALS)
        self.cur = 0
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        if tokens is not None:  # the tokens seen: what ``advance`` checks a write position against
            self.n = torch.tensor(tokens, dtype=torch.int64, device=device)

    def advance(self, p: torch.Tensor) -> None:
        """The step's token at the device position ``p`` [1]: raise ``bad`` unless it is the next one, then count it
        (device ops only: a replayed step checks its position too)."""
        self.bad |= p[0] != self.n
        self.n.add_(1)

    def replayed(self, site, steps: int) -> None:
        """Host-side bookkeeping for ``steps`` one-token steps a CUDA graph replayed: one stored row each."""
        if steps > 0:
            site.count_static_steps(1, False, steps)

    def fits(self, site) -> bool:
        return True

    def tensors(self) -> Iterable[torch.Tensor]:
        return ()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def parse_static(policy, value, problems: list[str]) -> None:
    """``policy_options['static']`` of a policy with a static path: True requires it (``problems``, what in the
    policy's options that path does not do, must be empty), "auto" takes it where ``problems`` is empty, False never.
    Sets ``policy.static`` and ``policy.static_required``."""
    if value not in (True, False, "auto") or isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"{policy.name} policy: policy_options['static'] expected True, False or 'auto', got "
                         f"{value!r}; fix: pass static='auto' (the default) or True / False")
    policy.static_required = value is True
    if policy.static_required and problems:
        raise ValueError(f"{policy.name} policy: policy_options['static']=True does not support "
                         + ", ".join(problems) + "; fix: drop those options or decode without static=True")
    policy.static = value is True or (value == "auto" and not problems)
