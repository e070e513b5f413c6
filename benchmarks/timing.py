"""Timing and memory helpers for ``benchmarks/run.py``.

Candidates of one comparison are timed interleaved (one call of each per round), so that load from
other processes on a shared machine hits all of them alike; medians and minima are both reported
(the minimum is the least disturbed run).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> Tuple[float, float, int]:
    """``(wall, cpu, faults)`` of one call: wall seconds from CUDA events on GPU, perf_counter on CPU;
    ``cpu`` the process CPU time (all threads), less sensitive to other processes on a shared machine;
    ``faults`` the process's minor page faults during the call (memory the OS had to map in)."""
    c0, f0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        wall = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    return wall, time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, device: torch.device,
                warmup: int = 1) -> Dict[str, Dict[str, List[float]]]:
    """Times every candidate once per round, round after round.

    Returns:
        ``{name: {"wall": [s, ...], "cpu": [s, ...], "faults": [n, ...]}}``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: {"wall": [], "cpu": [], "faults": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for key, value in zip(("wall", "cpu", "faults"), time_call(fn, device), strict=True):
                times[name][key].append(value)
    return times


def stats(times: Dict[str, List[float]]) -> Dict[str, float]:
    wall, cpu = times["wall"], times["cpu"]
    return {"median_s": statistics.median(wall), "min_s": min(wall), "cpu_median_s": statistics.median(cpu),
            "faults_median": statistics.median(times["faults"]), "n": len(wall)}


def peak_step_memory(step: Callable[[], object], device: torch.device) -> Dict[str, object]:
    """Peak bytes allocated by tensors created during one call of ``step``.

    CUDA: ``torch.cuda.max_memory_allocated`` above the level before the call. CPU: the profiler's
    allocator trace (``profile_memory``): the running "Total Allocated" counts every CPU tensor
    allocation and free during the call, so its maximum is the step's peak above what already existed
    (parameters, inputs, optimizer state from earlier steps). Allocator caching and RSS are not counted.
    """
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base,
                "method": "cuda max_memory_allocated"}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return {"peak_bytes": max(totals, default=0), "method": "torch.profiler CPU allocator trace"}
