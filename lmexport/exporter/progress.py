"""What a conversion is doing, on stderr: a bar per phase on a terminal (tqdm), one plain line per
phase when stderr is a file or a pipe (logs stay readable), nothing when quiet."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: Linux's VmHWM where there is one,
    since getrusage's ru_maxrss also holds what the parent had resident when it started this
    process (a child of a 3 GB process reports 3 GB at least)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Phase:
    """One phase's counters: tensors done of `tensors`, bytes done of `nbytes`."""

    def __init__(self, name: str, tensors: int, nbytes: int, bar: tqdm | None) -> None:
        self.name, self.tensors, self.nbytes, self.bar = name, tensors, nbytes, bar
        self.tensors_done = 0
        self.bytes_done = 0
        self.started = time.perf_counter()

    def advance(self, tensors: int = 0, nbytes: int = 0) -> None:
        self.tensors_done += tensors
        self.bytes_done += nbytes
        if self.bar is not None:
            if nbytes:
                self.bar.update(nbytes)
            if tensors:
                self.bar.set_postfix_str(f"{self.tensors_done}/{self.tensors} tensors")

    def summary(self) -> str:
        took = time.perf_counter() - self.started
        done = (
            f"{self.tensors_done} tensors, {human_bytes(self.bytes_done)}, " if self.tensors else ""
        )
        return f"{self.name}: {done}{took:.1f} s, peak RSS {human_bytes(peak_rss())}"


class Progress:
    """`enabled=False` (the API's default, the CLI's --quiet) prints nothing."""

    def __init__(self, enabled: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.bars = enabled and self.stream.isatty()

    @contextlib.contextmanager
    def phase(self, name: str, tensors: int = 0, nbytes: int = 0) -> Iterator[Phase]:
        bar = None
        if self.bars:
            bar = tqdm(
                total=nbytes or None,
                desc=f"{name:>8}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                dynamic_ncols=True,
                # Without bytes to count (trace, save) the bar is the time it took.
                bar_format=None if nbytes else "{desc}: {elapsed}{postfix}",
            )
            if tensors:
                bar.set_postfix_str(f"0/{tensors} tensors")
        phase = Phase(name, tensors, nbytes, bar)
        try:
            yield phase
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        if bar is not None:
            done = f"{phase.tensors_done}/{tensors} tensors, " if tensors else ""
            bar.set_postfix_str(f"{done}peak RSS {human_bytes(peak_rss())}")
            bar.close()
        elif self.enabled:
            print(phase.summary(), file=self.stream, flush=True)
