"""Peak memory per benchmark phase (process RSS on CPU, allocated tensors on CUDA).

Shared by the benchmarks in this folder (imported as a sibling module: each benchmark is run as a
script, so this folder is on ``sys.path``). Standard library only at import time, so it also runs in
the separate TRL environment of ``ppo_vs_trl.py``. See ``ppo_step.py``'s docstring for what the
figures mean and their caveats.
"""

from __future__ import annotations

import contextlib
import threading
import time

MB = 1024 * 1024


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_reader():
    """A function returning the process RSS in bytes (psutil if importable, else /proc)."""
    try:
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    except ImportError:
        return lambda: (_read_status_kb("VmRSS") or 0) * 1024


def _malloc_trim() -> None:
    """Hand glibc's cached free memory back to the OS (no-op elsewhere), so that RSS at a phase
    start is close to the live memory rather than the largest footprint seen so far."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory per phase, in bytes above a baseline.

    CPU: a daemon thread samples RSS every ``interval`` seconds; the kernel's VmHWM (reset at
    each phase start) catches peaks between samples. CUDA: ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: str, interval: float = 0.002):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.interval = interval
        self.rss = _rss_reader()
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.baseline = self.current()

    def current(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated()
        return self.rss()

    def start(self) -> None:
        if self.cuda or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss-sampler")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = self.rss()
            with self._lock:
                if value > self._peak:
                    self._peak = value
            time.sleep(self.interval)

    def held(self) -> int:
        return self.current() - self.baseline

    @contextlib.contextmanager
    def phase(self, record: dict, name: str):
        """Store the phase's peak (bytes above the baseline) in ``record[name]``."""
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            yield
            self.torch.cuda.synchronize()
            record[name] = self.torch.cuda.max_memory_allocated() - self.baseline
            return
        _malloc_trim()
        hwm_ok = _reset_hwm()
        with self._lock:
            self._peak = self.rss()
        yield
        peak = self.rss()
        with self._lock:
            peak = max(peak, self._peak)
        if hwm_ok:
            peak = max(peak, (_read_status_kb("VmHWM") or 0) * 1024)
        record[name] = peak - self.baseline


