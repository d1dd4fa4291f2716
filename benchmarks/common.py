"""Shared helpers for the benchmark scripts: machine description and timing."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}"
    )


def best_time(run: Callable[[], object], repeats: int = 3, min_seconds: float = 0.2) -> float:
    """Best wall time of one call over ``repeats`` rounds; each round repeats the call for at least ``min_seconds``."""
    run()  # warm-up: first-call dispatch and allocation costs
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best
