"""End to end: `python space/app.py` served on localhost, driven by gradio_client and by headless Debian chromium.

One server per module. Set UPDATE_DOCS_IMAGES=1 to refresh docs/images/space.png from the browser test.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_space import (
    EMBEDDED_ADAPTER,
    EMBEDDED_PIPELINE,
    REPO_ROOT,
    demo_models,
    load_space_module,
    make_variant_adapter,
    pixels,
)

from bench.generate import stop_process

pytestmark = pytest.mark.slow

# Debian's chromium (or CHROMIUM_PATH); without it, Playwright's own build (.ci/install_browser.sh installs one).
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
SCREENSHOT = REPO_ROOT / "docs" / "images" / "space.png"
STARTUP_TIMEOUT_S = 120
FAST_STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path) -> None:
    """Poll the server until it answers; fail with its log if it dies or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"space/app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"space/app.py did not serve {url} within {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    return demo_models(tmp_path_factory)


def serve_space(settings: dict[str, str], tmp_path_factory):
    """Start the app exactly as a user does, `python space/app.py`, on a free local port; yield its URL."""
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    for key in ("BASE_MODEL", "LORA_ADAPTER", "LORA_ADAPTERS", "LORA_WEIGHT_NAME"):
        env.pop(key, None)
    env.update(settings)
    log_path = tmp_path_factory.mktemp("space_server") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "space" / "app.py")], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log_path)
        yield url
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    # With the embedded default committed, run with no settings at all, as `python space/app.py` would.
    embedded = (str(EMBEDDED_PIPELINE), str(EMBEDDED_ADAPTER)) == models
    yield from serve_space({} if embedded else {"BASE_MODEL": models[0], "LORA_ADAPTER": models[1]}, tmp_path_factory)


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory) -> dict[str, str]:
    """Two adapters for one base: the demo and a deterministic variant that learned the same word differently."""
    variant = make_variant_adapter(models[1], tmp_path_factory.mktemp("variant") / "demo_adapter_variant")
    return {"purple": models[1], "purple-variant": str(variant)}


@pytest.fixture(scope="module")
def multi_server(models, adapters, tmp_path_factory):
    """The Space serving both adapters: LORA_ADAPTERS=purple=<demo>,purple-variant=<variant>."""
    setting = ",".join(f"{name}={reference}" for name, reference in adapters.items())
    yield from serve_space({"BASE_MODEL": models[0], "LORA_ADAPTERS": setting}, tmp_path_factory)


@pytest.fixture(scope="module")
def multi_client(multi_server):
    from gradio_client import Client

    return Client(multi_server, verbose=False)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def predict(client, prompt: str, seed: int = 0, steps: int = FAST_STEPS, compare: bool = False, **overrides):
    """Call /generate in the UI's argument order (randomize off so the seed is used); `adapter=` is appended last."""
    arguments = {"negative_prompt": "", "guidance": 5.0, "lora_scale": 1.0, **overrides}
    adapter = [arguments["adapter"]] if "adapter" in arguments else []
    return client.predict(
        prompt,
        arguments["negative_prompt"],
        seed,
        False,
        steps,
        arguments["guidance"],
        arguments["lora_scale"],
        compare,
        *adapter,
        api_name="/generate",
    )


def test_client_prediction_returns_image_file_matching_generate(client, models):
    image_path, gallery, seed_used, info = predict(client, "a red circle on a white background", seed=11)
    assert Path(image_path).is_file()
    served = Image.open(image_path)
    assert seed_used == 11 and "11" in info and gallery == []
    # The same call in this process gives the same picture: the API passes every setting through.
    app = load_space_module("app")
    pipe = app.load_pipeline(*models, device="cpu")
    local = app.generate("a red circle on a white background", "", 11, FAST_STEPS, 5.0, 1.0, pipe=pipe)
    assert served.size == local[0].size
    assert np.abs(pixels(served) - pixels(local[0])).mean() < 1.0


def test_every_api_parameter_has_a_default_by_position_and_by_keyword(client):
    """A gradio_client user gives the prompt alone, as the README's one-liner does."""
    for call in (
        lambda: client.predict("a purple star on a white background", api_name="/generate"),
        lambda: client.predict(prompt="a purple star on a white background", api_name="/generate"),
    ):
        image_path, gallery, seed_used, info = call()
        assert Image.open(image_path).size[0] > 0 and gallery == [] and f"{seed_used}" in info
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in parameters if not p["parameter_has_default"]] == ["prompt"]


def test_compare_returns_base_and_adapter_images(client):
    image_path, gallery, _, _ = predict(client, "a blue square", seed=4, compare=True)
    assert len(gallery) == 2
    base, adapter = (Image.open(item["image"]) for item in gallery)
    assert np.array_equal(pixels(adapter), pixels(Image.open(image_path)))
    assert not np.array_equal(pixels(base), pixels(adapter))


def test_eight_parallel_requests_all_succeed(client):
    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = [pool.submit(predict, client, f"a green circle {index}", seed=index) for index in range(8)]
        results = [job.result(timeout=120) for job in jobs]
    assert [result[2] for result in results] == list(range(8))
    assert all(Image.open(result[0]).size[0] > 0 for result in results)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        # Gradio's slider checks its own bounds first; either message names the limit.
        ({"steps": 0}, "minimum value 1|Steps must be"),
        ({"guidance": 50.0}, "maximum value 20|Guidance must be"),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"seed": 2.5}, "Seed must be a whole number"),
        ({"seed": -1}, "Seed must be a whole number between 0 and"),
    ],
)
def test_invalid_inputs_return_errors_and_server_keeps_serving(client, overrides, message):
    from gradio_client.exceptions import AppError

    prompt = overrides.pop("prompt", "a red square")
    with pytest.raises(AppError, match=message):
        predict(client, prompt, **overrides)
    image_path, *_ = predict(client, "a red square", seed=1)
    assert Path(image_path).is_file()


def test_parallel_requests_for_two_adapters_never_mix(multi_client, models, adapters):
    """8 requests at once alternating the adapters: each image is the one the single-adapter Space draws."""
    app = load_space_module("app")
    names = list(adapters)
    jobs = [(names[index % 2], f"a purple star on a white background {index}", index) for index in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(predict, multi_client, prompt, seed=seed, adapter=name) for name, prompt, seed in jobs]
        served = [future.result(timeout=300) for future in futures]
    assert [result[2] for result in served] == [seed for _, _, seed in jobs]
    # The references: one pipeline per adapter loaded alone, as `LORA_ADAPTER=<adapter>` would, on one thread as
    # the server runs (OMP_NUM_THREADS=1), so the arithmetic is the same.
    singles = {name: app.load_pipeline(models[0], reference, device="cpu") for name, reference in adapters.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for (name, prompt, seed), result in zip(jobs, served, strict=True):
            expected = app.generate(prompt, "", seed, FAST_STEPS, 5.0, 1.0, pipe=singles[name])[0]
            difference = np.abs(pixels(Image.open(result[0])) - pixels(expected)).max()
            assert difference < 1.0, f"request {seed} ({name}) differs from its single-adapter image by {difference}"
        other = app.generate(jobs[0][1], "", jobs[0][2], FAST_STEPS, 5.0, 1.0, pipe=singles[names[1]])[0]
    finally:
        torch.set_num_threads(threads)
    assert np.abs(pixels(Image.open(served[0][0])) - pixels(other)).max() >= 1.0, "the adapters should differ"


def test_multi_adapter_space_keeps_the_single_adapter_api(multi_client):
    """The prompt alone still works (the first adapter), and positional calls without the adapter too."""
    image_path, gallery, seed_used, _ = multi_client.predict(
        "a purple star on a white background", api_name="/generate"
    )
    assert Image.open(image_path).size[0] > 0 and gallery == []
    _, gallery, _, _ = predict(multi_client, "a blue square", seed=4, compare=True, adapter="purple-variant")
    assert len(gallery) == 2 and "purple-variant" in gallery[1]["caption"]
    parameters = multi_client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    assert parameters["parameters"][-1]["parameter_name"] == "adapter"


def test_browser_types_prompt_clicks_and_sees_a_non_blank_image(multi_server):
    from playwright.sync_api import sync_playwright

    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as playwright:
        executable = {"executable_path": str(CHROMIUM)} if CHROMIUM.is_file() else {}
        try:
            browser = playwright.chromium.launch(headless=True, args=args, **executable)
        except Exception as error:  # neither browser installed: say how to get one
            hint = "No Chromium for the browser test: run `bash .ci/install_browser.sh`."
            raise AssertionError(f"{hint} ({error})") from error
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(multi_server, wait_until="domcontentloaded", timeout=60_000)
            page.get_by_label("Prompt").fill("a purple star")  # short, as people type it
            assert page.locator("#result img").count() == 0, "no image before the first run"
            # Pick the second adapter in the dropdown, draw, then back to the first: both are served from the page.
            choose_adapter(page, "purple-variant")
            page.get_by_role("button", name="Run", exact=True).click()
            image = page.locator("#result img").first
            image.wait_for(state="visible", timeout=60_000)
            loaded = (
                "() => { const i = document.querySelector('#result img'); return i?.complete && i.naturalWidth > 0; }"
            )
            page.wait_for_function(loaded, timeout=30_000)
            page.get_by_text("Seed used:").wait_for(timeout=30_000)
            first_source = image.get_attribute("src")
            choose_adapter(page, "purple")
            page.get_by_role("button", name="Run", exact=True).click()
            changed = "(old) => { const i = document.querySelector('#result img'); return i && i.src !== old; }"
            page.wait_for_function(changed, arg=first_source, timeout=60_000)
            page.wait_for_function(loaded, timeout=30_000)
            shot = np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("RGB"), dtype=np.float32)
            assert shot.size > 0 and shot.var() > 0, "the image element is blank"
            if os.environ.get("UPDATE_DOCS_IMAGES") == "1":
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()


def choose_adapter(page, name: str) -> None:
    """Open the Adapter dropdown and click the entry `name`."""
    page.get_by_label("Adapter").click()
    page.get_by_role("option", name=name, exact=True).click()
    assert page.get_by_label("Adapter").input_value() == name


def test_long_prompt_is_served_with_a_visible_truncation_notice(client):
    image_path, _, _, info = predict(client, " ".join(["a red circle on a white background"] * 20), seed=2)
    assert Path(image_path).is_file()
    assert "ignored" in info and "tokens" in info
