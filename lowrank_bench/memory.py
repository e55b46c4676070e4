"""Peak memory of a run, measured while it trains."""
from __future__ import annotations

import os
import resource
import threading

import torch


class MemoryMonitor:
    """Peak memory of one run: CUDA's allocator peak on a GPU; on the CPU, the process's resident set size sampled
    every 20 ms from /proc (the kernel's own max-RSS counter never resets, so in a sweep it would repeat the
    largest earlier run's figure)."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval, self.peak_bytes = device, interval, 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            try:
                with open("/proc/self/statm") as handle:
                    self.peak_bytes = max(self.peak_bytes, int(handle.read().split()[1]) * page)
            except OSError:  # not Linux: fall back to the process-lifetime maximum
                self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()
        elif self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_peak"

    @property
    def megabytes(self) -> float:
        return round(self.peak_bytes / 2**20, 1)
