"""Wall-clock time per named phase of a computation: how a method reports where its time goes.

On CUDA, kernels run asynchronously; each phase boundary synchronises the device so the time of
a phase is the time of its kernels, not of their launches (a few synchronisations per iteration
cost nothing next to a U-Net call).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class PhaseClock:
    """Accumulates seconds and entries per phase name."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.entries: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            self.entries[name] += 1

    def report(self) -> dict[str, dict[str, float]]:
        """``{phase: {"seconds": s, "entries": n}}`` in the order phases first ran."""
        return {k: {"seconds": s, "entries": self.entries[k]} for k, s in self.seconds.items()}
