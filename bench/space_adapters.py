"""`python -m bench space-adapters`: the Space serving several adapters on one base (LORA_ADAPTERS).

Two figures: what a request pays when it asks for another adapter than the one before it (per-request
`set_adapters` and the learned words' rows), against a request for the same adapter; and the memory of the Space
process (`python space/app.py`) serving 1, 2 and 4 adapters.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

from bench.generate import SPACE_APP, free_port, load_space_app, space_server_env, stop_process, wait_for_client

ADAPTER_COUNTS = (1, 2, 4)
SERVE_TIMEOUT_S = 300


def variant_adapters(adapter: str, count: int, work_dir: Path) -> list[str]:
    """`adapter` and count-1 copies with every tensor nudged by seeded noise (learned words too): adapters of the
    same shape and size, which is all that the timings and the memory depend on."""
    source = Path(adapter)
    made = [adapter]
    for index in range(1, count):
        out = work_dir / "space-adapters" / f"variant{index}"
        out.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(index)
        for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
            if (source / name).is_file():
                tensors = load_file(source / name)
                nudged = {k: v + v.std() * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
                save_file(nudged, str(out / name))
        made.append(str(out))
    return made


def _timed_request(app, pipe, prompt: str, steps: int, adapter: str) -> float:
    start = time.perf_counter()
    app.generate(prompt, "", 0, steps, app.DEFAULT_GUIDANCE, 1.0, pipe=pipe, adapter=adapter)
    return time.perf_counter() - start


def _timed_select(app, pipe, adapter: str) -> float:
    """The per-request adapter selection alone: what `generate` does under the lock before sampling."""
    start = time.perf_counter()
    pipe.set_adapters([adapter], adapter_weights=[1.0])
    app.use_learned_words(pipe, 1.0, adapter)
    return time.perf_counter() - start


def switch_latency(app, base: str, adapters: list[str], device: str, steps: int, repeats: int, prompt: str) -> dict:
    """Requests through the Space's `generate` on one pipeline holding two adapters, "first" (the default) and
    "second" (not one-letter names: diffusers matches the adapter name as a substring of the weight keys when it
    reports missing ones, so "b" would warn about every "blocks" key of the other adapter).

    Between requests the Space's pipeline rests on its default adapter (generate puts it back whatever happened),
    so a request for "first" selects the adapter already in place ("same"), and a request for "second" switches to
    it and back ("switching"), whichever adapter the request before it used. They are interleaved (first, second,
    ...) so
    a change in machine load hits both alike. The selection alone (set_adapters and the learned words' rows, as
    generate does under the lock) is timed too, without sampling.
    """
    pipe = app.load_pipeline(base, [("first", adapters[0]), ("second", adapters[1])], device=device)
    for name in ("first", "second"):
        _timed_request(app, pipe, prompt, steps, name)  # warm-up
    same, switch, same_select, switch_select = [], [], [], []
    for _ in range(repeats):
        same.append(_timed_request(app, pipe, prompt, steps, "first"))
        switch.append(_timed_request(app, pipe, prompt, steps, "second"))
        same_select.append(_timed_select(app, pipe, "first"))
        switch_select.append(_timed_select(app, pipe, "second"))
        _timed_select(app, pipe, "first")  # back to the resting state, as generate leaves it
    same_s, switch_s = statistics.median(same), statistics.median(switch)
    return {
        "steps": steps,
        "repeats": repeats,
        "same_adapter_request_s": same_s,
        "switching_request_s": switch_s,
        "switching_over_same": switch_s / same_s,
        # On a shared machine the fastest of each kind is the steadier comparison (load only ever adds time).
        "same_adapter_request_min_s": min(same),
        "switching_request_min_s": min(switch),
        "switching_over_same_min": min(switch) / min(same),
        "same_adapter_select_ms": 1000 * statistics.median(same_select),
        "switching_select_ms": 1000 * statistics.median(switch_select),
        "samples": {"same": same, "switching": switch},
    }


def space_rss(base: str, adapters: list[str], device: str, prompt: str, steps: int, log_path: Path) -> dict:
    """Start `python space/app.py` with LORA_ADAPTERS=<adapters>, serve one image, read the process's memory."""

    port = free_port()
    adapters_setting = ",".join(f"adapter{index}={ref}" for index, ref in enumerate(adapters))
    env = space_server_env(port, device, BASE_MODEL=base, LORA_ADAPTERS=adapters_setting)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(SPACE_APP)], env=env, stdout=log, stderr=subprocess.STDOUT)
    started = time.perf_counter()
    try:
        client = wait_for_client(process, f"http://127.0.0.1:{port}/", started, SERVE_TIMEOUT_S, log_path)
        # One image per adapter, so every adapter's first-use allocations are in the figure.
        for index in range(len(adapters)):
            client.predict(prompt, "", 0, False, steps, 7.5, 1.0, False, f"adapter{index}", api_name="/generate")
        memory = psutil.Process(process.pid).memory_full_info()
        peak_kib = _peak_rss_kib(process.pid)
    finally:
        stop_process(process)
    return {
        "adapters": len(adapters),
        "rss_mib": memory.rss / 2**20,
        "uss_mib": memory.uss / 2**20,
        "peak_rss_mib": peak_kib / 1024 if peak_kib is not None else None,
    }


def _peak_rss_kib(pid: int) -> int | None:
    """VmHWM (the process's peak resident set) from /proc on Linux, else None."""
    status = Path(f"/proc/{pid}/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def run_space_adapters_bench(
    base: str, adapter: str, device: str, steps: int | None, short: bool, work_dir: Path
) -> dict:
    """Switching latency with two adapters, and the Space process's memory with 1, 2 and 4 adapters."""
    app = load_space_app()
    steps = steps or app.DEFAULT_STEPS
    if short:
        steps = min(steps, 2)
    repeats = 2 if short else 15
    prompt = app.load_examples()[0]
    adapters = variant_adapters(adapter, max(ADAPTER_COUNTS), work_dir)
    switching = switch_latency(app, base, adapters[:2], device, steps, repeats, prompt)
    memory = [
        space_rss(base, adapters[:count], device, prompt, steps, work_dir / f"space-{count}-adapters.log")
        for count in ADAPTER_COUNTS
    ]
    adapter_mib = Path(adapter, "pytorch_lora_weights.safetensors").stat().st_size / 2**20
    return {
        "base_model": base,
        "adapter": adapter,
        "device": device,
        "prompt": prompt,
        "adapter_file_mib": adapter_mib,
        "switching": switching,
        "memory": memory,
        "rss_per_extra_adapter_mib": (memory[-1]["rss_mib"] - memory[0]["rss_mib"]) / (ADAPTER_COUNTS[-1] - 1),
    }
