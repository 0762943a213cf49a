"""`python -m bench generate`: seconds per image with the Space's own code (space/app.py), and its cold start."""

from __future__ import annotations

import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, PNDMScheduler

from lorakit.paths import REPO_ROOT

SPACE_APP = REPO_ROOT / "space" / "app.py"
COLD_START_TIMEOUT_S = 600


def load_space_app():
    """Import space/app.py by file path (the Space folder is deliberately not a package)."""
    spec = importlib.util.spec_from_file_location("bench_space_app", SPACE_APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_image(app, pipe, prompt: str, steps: int, device: str) -> tuple[float, np.ndarray]:
    """One image through the Space's sampling function; returns (seconds, pixels)."""
    _sync(device)
    start = time.perf_counter()
    image = app._sample(pipe, prompt, "", 0, steps, app.DEFAULT_GUIDANCE, None, 0, steps)
    _sync(device)
    return time.perf_counter() - start, np.asarray(image, dtype=np.float32)


def time_round_robin(app, variants: dict, prompt: str, repeats: int, device: str) -> dict[str, dict]:
    """Interleave the variants so a change in machine load hits them all alike; one warm-up image each."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    pixels: dict[str, np.ndarray] = {}
    for name, (pipe, steps) in variants.items():
        pixels[name] = seconds_per_image(app, pipe, prompt, steps, device)[1]
    for _ in range(repeats):
        for name, (pipe, steps) in variants.items():
            times[name].append(seconds_per_image(app, pipe, prompt, steps, device)[0])
    return {
        name: {
            "steps": variants[name][1],
            "seconds_per_image": statistics.median(values),
            "samples": values,
            "pixels": pixels[name],
        }
        for name, values in times.items()
    }


def base_pipeline(app, base: str, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    """The base model alone, set up as the Space sets up its pipeline (DPM-Solver++, no progress bar)."""
    pipe = DiffusionPipeline.from_pretrained(base, use_safetensors=True, **{app._DTYPE_KWARG: dtype})
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def adapter_load_seconds(pipe: DiffusionPipeline, adapter: str, repeats: int) -> float:
    """Median time to load the adapter into an already loaded base pipeline (what a Space pays per adapter)."""
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        pipe.load_lora_weights(adapter, adapter_name=f"timed{index}", use_safetensors=True)
        times.append(time.perf_counter() - start)
        pipe.unload_lora_weights()
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def space_server_env(port: int, device: str, **settings: str) -> dict[str, str]:
    """The environment of a `python space/app.py` served on localhost `port`, offline, with the Space's settings
    (BASE_MODEL, LORA_ADAPTER or LORA_ADAPTERS); the other adapter setting is dropped so the two never mix."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("LORA_ADAPTER", "LORA_ADAPTERS")},
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        **settings,
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def wait_for_client(process: subprocess.Popen, url: str, started: float, timeout_s: float, log_path: Path):
    """A gradio_client Client of the Space at `url` once it serves; a clear error if it exits or takes too long."""
    from gradio_client import Client

    while True:
        if process.poll() is not None:
            raise RuntimeError(f"space/app.py exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"space/app.py did not serve within {timeout_s}s; log: {log_path}")
        try:
            return Client(url, verbose=False)
        except Exception:  # connection refused until gradio is up; any error here means "not yet"
            time.sleep(0.25)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate, then kill if it does not exit within 15 s."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def space_cold_start(base: str, adapter: str, steps: int, prompt: str, log_path: Path, device: str) -> dict:
    """`python space/app.py` from process start to the first image returned over the API (gradio_client)."""

    port = free_port()
    env = space_server_env(port, device, BASE_MODEL=base, LORA_ADAPTER=adapter)
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(SPACE_APP)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = wait_for_client(process, url, started, COLD_START_TIMEOUT_S, log_path)
        serving_s = time.perf_counter() - started
        client.predict(prompt, "", 0, False, steps, 7.5, 1.0, False, api_name="/generate")
        first_image_s = time.perf_counter() - started
    finally:
        stop_process(process)
    return {"serving_s": serving_s, "first_image_s": first_image_s, "steps": steps}


def run_generate_bench(
    base: str, adapter: str, device: str, steps: int | None, short: bool, work_dir: Path, cold_start: bool = True
) -> dict:
    """Every generation figure for one base + adapter, measured in this process (ratios from one run)."""
    app = load_space_app()
    steps = steps or app.DEFAULT_STEPS
    pndm_steps = 50
    if short:
        steps, pndm_steps = min(steps, 4), 8
    repeats = 1 if short else 5
    prompt = app.load_examples()[0]
    low_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    full_dtype = torch.float16 if device == "cuda" else torch.float32

    start = time.perf_counter()
    unfused = app.load_pipeline(base, adapter, device=device)
    pipeline_load_s = time.perf_counter() - start
    base_pipe = base_pipeline(app, base, device, full_dtype)
    load_s = adapter_load_seconds(base_pipe, adapter, repeats=1 if short else 3)
    fused = app.load_pipeline(base, adapter, device=device)
    fused.fuse_lora()
    # Fused, then the LoRA wrappers removed: plain modules holding the merged weights (what a deployment ships).
    fused_unloaded = app.load_pipeline(base, adapter, device=device)
    fused_unloaded.fuse_lora()
    fused_unloaded.unload_lora_weights()
    pndm = app.load_pipeline(base, adapter, device=device)
    pndm.scheduler = PNDMScheduler.from_config(pndm.scheduler.config)
    other_precision = app.load_pipeline(base, adapter, device=device)
    other_dtype = torch.float32 if device == "cuda" else low_dtype
    other_precision.to(dtype=other_dtype)

    variants = {
        "base": (base_pipe, steps),
        "lora_unfused": (unfused, steps),
        "lora_fused": (fused, steps),
        "lora_fused_unloaded": (fused_unloaded, steps),
        "pndm_50": (pndm, pndm_steps),
        str(other_dtype).replace("torch.", ""): (other_precision, steps),
    }
    timed = time_round_robin(app, variants, prompt, repeats, device)
    image_px = unfused.unet.config.sample_size * unfused.vae_scale_factor
    timed_pixels = {name: row.pop("pixels") for name, row in timed.items()}
    fused_pixels_match = float(np.abs(timed_pixels["lora_fused"] - timed_pixels["lora_unfused"]).max())
    default_s = timed["lora_unfused"]["seconds_per_image"]
    result = {
        "base_model": base,
        "adapter": adapter,
        "device": device,
        "dtype": str(full_dtype).replace("torch.", ""),
        "image_px": image_px,
        "prompt": prompt,
        "repeats": repeats,
        "default_scheduler": "DPMSolverMultistepScheduler (dpmsolver++)",
        "pipeline_load_s": pipeline_load_s,
        "adapter_load_s": load_s,
        "variants": timed,
        "ratios": {
            "fused_over_base": timed["lora_fused"]["seconds_per_image"] / timed["base"]["seconds_per_image"],
            "fused_unloaded_over_base": timed["lora_fused_unloaded"]["seconds_per_image"]
            / timed["base"]["seconds_per_image"],
            "unfused_over_base": default_s / timed["base"]["seconds_per_image"],
            "pndm_50_over_default": timed["pndm_50"]["seconds_per_image"] / default_s,
            "other_precision_over_default": timed[str(other_dtype).replace("torch.", "")]["seconds_per_image"]
            / default_s,
        },
        "fused_vs_unfused_max_pixel_difference": fused_pixels_match,
    }
    result["checks"] = {
        "fused_within_5_percent_of_base": result["ratios"]["fused_over_base"] <= 1.05,
        "fused_unloaded_within_5_percent_of_base": result["ratios"]["fused_unloaded_over_base"] <= 1.05,
    }
    result["fused_unloaded_vs_unfused_max_pixel_difference"] = float(
        np.abs(timed_pixels["lora_fused_unloaded"] - timed_pixels["lora_unfused"]).max()
    )
    del unfused, fused, fused_unloaded, pndm, other_precision, base_pipe
    if cold_start:
        result["space_cold_start"] = space_cold_start(base, adapter, steps, prompt, work_dir / "space.log", device)
    return result


def default_models(base: str | None, adapter: str | None, work_dir: Path) -> tuple[str, str]:
    """The Space's defaults; for another base without an adapter, a one-step adapter trained here."""
    app = load_space_app()
    if base is None and adapter is None:
        return app.default_base(), app.default_adapter()
    base = base or app.default_base()
    return base, adapter or one_step_adapter(base, work_dir)


def one_step_adapter(base: str, work_dir: Path) -> str:
    """Train one step with the real trainer and the default preset's LoRA settings (rank, target modules).

    A correctly shaped adapter for timing; its content is irrelevant to speed.
    """
    from accelerate.state import AcceleratorState

    import train_lora
    from bench.data import make_image_folder
    from lorakit.config import parse_args
    from lorakit.filenames import ADAPTER_FILE
    from lorakit.paths import SHAPES_PRESET

    out = work_dir / "generate-adapter" / Path(base).name
    if (out / ADAPTER_FILE).is_file():
        return str(out)
    data = make_image_folder(work_dir / "data-png-64-4", 4, 64)
    AcceleratorState._reset_state(reset_partial_state=True)
    train_lora.train(
        parse_args(
            [
                "--config",
                str(SHAPES_PRESET),
                "--pretrained_model_name_or_path",
                base,
                "--train_data_dir",
                str(data),
                "--resolution",
                "64",
                "--train_batch_size",
                "1",
                "--max_train_steps",
                "1",
                "--output_dir",
                str(out),
                "--overwrite_output_dir",
                "--report_to",
                "none",
                "--validation_prompt",
                "--train_token_embeddings",  # the preset's learned word belongs to the embedded world's tokenizer
            ]
        )
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    return str(out)
