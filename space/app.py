"""Gradio Space: text to image with one or several LoRA adapters on a Stable-Diffusion-architecture base.

Settings come from the environment (Space variables on the Hub):
- BASE_MODEL: Hub id or local folder of the base pipeline (default: the repo's embedded pipeline if present).
- LORA_ADAPTER: Hub id or local folder of the LoRA adapter (default: the repo's embedded demo adapter).
- LORA_ADAPTERS: several adapters on the one base, comma-separated, each `name=reference` or `reference`
  (e.g. `purple=embedded/demo_adapter,other=alice/lora`); a dropdown picks one per request. Wins over LORA_ADAPTER.
- LORA_WEIGHT_NAME: optional file name of the adapter weights inside each adapter.

This file imports pip packages only, so the folder deploys on its own.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import gradio as gr
import numpy as np
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
from packaging.version import Version
from PIL import Image
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
# The embedded default lives next to this folder in the source repository; on a Space it is absent.
EMBEDDED_DIR = HERE.parent / "embedded"
EMBEDDED_PIPELINE = EMBEDDED_DIR / "pipeline"
EMBEDDED_ADAPTER = EMBEDDED_DIR / "demo_adapter"
EMBEDDED_PROMPTS = EMBEDDED_DIR / "prompts" / "adapter.txt"
HUB_DEFAULT_BASE = "nota-ai/bk-sdm-tiny"
ADAPTER_NAME = "adapter"  # the adapter's name inside the pipeline when LORA_ADAPTER (one adapter) is used
# An adapter name becomes a key of torch ModuleDicts inside every LoRA layer, which refuse dots; keep it simple.
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# Words the training run learned beside the LoRA (train_lora.py --train_token_embeddings): {word: vector}.
LEARNED_EMBEDS_FILE = "learned_embeds.safetensors"  # lorakit.filenames.LEARNED_EMBEDS_FILE (no lorakit import here)

MAX_SEED = int(np.iinfo(np.int32).max)
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 1, 100, 20
MIN_GUIDANCE, MAX_GUIDANCE, DEFAULT_GUIDANCE = 0.0, 20.0, 7.5
MIN_LORA_SCALE, MAX_LORA_SCALE = 0.0, 1.5
QUEUE_MAX_SIZE = 32
CONCURRENCY_LIMIT = 1
# Small models draw 32-64 px images: show them large with crisp pixels rather than as a postage stamp.
CSS = """
#result img { image-rendering: pixelated; min-height: 256px; object-fit: contain; }
#compare img { image-rendering: pixelated; }
"""
# Short prompts first: what people type into a demo (the shapes world's captions name a background only sometimes).
# A neighbouring colour is among them, so a visitor sees the adapter leave other colours alone.
SHORT_EXAMPLES = ["a purple star", "purple circle", "a blue square", "purple cross against black"]
# Used when the embedded prompts are absent: the demo adapter's concept (a new colour, purple, in the shapes world).
FALLBACK_EXAMPLES = [
    *SHORT_EXAMPLES,
    "a purple circle on a white background",
    "a purple star on a black background",
]

# One pipeline is shared by all requests; its scheduler and adapter weights are mutable state.
_PIPE_LOCK = threading.Lock()
# diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name warns and goes away in 1.0).
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def default_base() -> str:
    """BASE_MODEL from the environment, else the embedded pipeline, else the Hub default."""
    if os.environ.get("BASE_MODEL"):
        return os.environ["BASE_MODEL"]
    return str(EMBEDDED_PIPELINE) if EMBEDDED_PIPELINE.is_dir() else HUB_DEFAULT_BASE


def default_adapter() -> str:
    """LORA_ADAPTER from the environment, else the embedded demo adapter."""
    if os.environ.get("LORA_ADAPTER"):
        return os.environ["LORA_ADAPTER"]
    if EMBEDDED_ADAPTER.is_dir():
        return str(EMBEDDED_ADAPTER)
    raise RuntimeError(
        "No LoRA adapter configured: set LORA_ADAPTER to a Hub id (user/adapter) or a local adapter folder "
        "(on a Space: Settings > Variables)."
    )


def parse_adapters(value: str, setting: str = "LORA_ADAPTERS") -> list[tuple[str, str]]:
    """`name=reference,reference,...` as [(name, reference)]; a name defaults to the reference's last part
    (`alice/lora` -> `lora`). Names must be unique and plain (they name the dropdown entries and the API value)."""
    adapters: list[tuple[str, str]] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            raise ValueError(f"{setting} has an empty entry in {value!r}: separate adapters with single commas.")
        # Split at the first '=': a name never holds one, a folder path might.
        name, _, reference = entry.partition("=") if "=" in entry else ("", "", entry)
        name, reference = name.strip(), reference.strip()
        if not reference:
            raise ValueError(f"{setting} entry {entry!r} has no adapter after '=': write name=user/adapter.")
        name = name or Path(reference.rstrip("/\\")).name
        if not ADAPTER_NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"{setting} entry {entry!r}: the name {name!r} must be letters, digits, '_' or '-' "
                "(give one explicitly: name=reference)."
            )
        if name in (known for known, _ in adapters):
            raise ValueError(f"{setting} names two adapters {name!r}: give each its own name (name=reference).")
        adapters.append((name, reference))
    return adapters


def configured_adapters() -> list[tuple[str, str]]:
    """[(name, reference)] from LORA_ADAPTERS, else the single LORA_ADAPTER (or the embedded demo) as ADAPTER_NAME."""
    if os.environ.get("LORA_ADAPTERS", "").strip():
        return parse_adapters(os.environ["LORA_ADAPTERS"])
    return [(ADAPTER_NAME, default_adapter())]


def pick_device() -> tuple[str, torch.dtype]:
    """CUDA, then MPS, then CPU; fp16 on accelerators, fp32 on CPU (fp16 matmuls are slow or missing there)."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps", torch.float16
    return "cpu", torch.float32


def check_reference(reference: str, setting: str) -> str:
    """Fail early on a local path that does not exist (else diffusers would try it as a Hub id)."""
    looks_local = reference.startswith(("/", ".", "~")) or reference.count("/") > 1 or "\\" in reference
    if looks_local and not Path(reference).expanduser().exists():
        raise FileNotFoundError(
            f"{setting} {reference!r} does not exist: give a Hub id (user/name) or an existing local folder."
        )
    return reference


def load_pipeline(
    base: str,
    adapter: str | Sequence[tuple[str, str]],
    device: str | None = None,
    weight_name: str | None = None,
) -> DiffusionPipeline:
    """Load the base pipeline once (safetensors only), attach each LoRA adapter once under its name, and switch
    to DPM-Solver++. `adapter` is one reference (named ADAPTER_NAME) or [(name, reference)]; the first is the
    default. `pipe.space_adapters` keeps the names in order."""
    check_reference(base, "BASE_MODEL")
    adapters = [(ADAPTER_NAME, adapter)] if isinstance(adapter, str) else list(adapter)
    if not adapters:
        raise ValueError("No LoRA adapter given: set LORA_ADAPTER or LORA_ADAPTERS.")
    setting = "LORA_ADAPTER" if isinstance(adapter, str) else "LORA_ADAPTERS"
    for _, reference in adapters:
        check_reference(reference, setting)
    device, dtype = pick_device() if device is None else (device, torch.float32 if device == "cpu" else torch.float16)
    pipe = DiffusionPipeline.from_pretrained(base, use_safetensors=True, **{_DTYPE_KWARG: dtype})
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{base} loads as {type(pipe).__name__}, which cannot take a LoRA adapter.")
    weight_name = weight_name if weight_name is not None else os.environ.get("LORA_WEIGHT_NAME") or None
    for name, reference in adapters:
        with warnings.catch_warnings():
            # peft warns on every adapter after the first that the model now holds several: here that is the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            pipe.load_lora_weights(reference, adapter_name=name, weight_name=weight_name, use_safetensors=True)
        embeds = learned_embeds_file(reference)
        if embeds is not None:
            attach_learned_words(pipe, load_file(embeds), name)
    pipe.space_adapters = [name for name, _ in adapters]
    # The default state between requests: the first adapter at full strength, with its words.
    pipe.set_adapters([adapters[0][0]], adapter_weights=[1.0])
    use_learned_words(pipe, 1.0, adapters[0][0])
    # Multistep DPM-Solver++ reaches the quality of 50 DDIM/PNDM steps in about 20.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def learned_embeds_file(adapter: str, api=None) -> str | None:
    """The adapter's learned_embeds.safetensors (local folder or Hub repo), or None if it learned no words."""
    path = Path(adapter)
    if path.exists():
        found = (path if path.is_dir() else path.parent) / LEARNED_EMBEDS_FILE
        return str(found) if found.is_file() else None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return (api or HfApi()).hf_hub_download(repo_id=adapter, filename=LEARNED_EMBEDS_FILE)
    except EntryNotFoundError:
        return None


@torch.no_grad()
def attach_learned_words(
    pipe: DiffusionPipeline, embeds: dict[str, torch.Tensor], adapter_name: str = ADAPTER_NAME
) -> None:
    """Add `adapter_name`'s learned words with diffusers' `load_textual_inversion`, as the model card's snippet
    does: each word becomes an added token carrying its learned vector.

    A tokenizer has one token per word, so two adapters that both learned "purple" cannot each add their own
    "purple" token (diffusers refuses a token already in the vocabulary, and two spellings would change the
    prompt's tokens against what the single adapter sees). Instead a word is added once, by the first adapter that
    learned it, and every adapter keeps its own vector for it in `pipe.learned_word_rows[adapter][token_id]`;
    `use_learned_words` writes the active adapter's vector into that one row per request, under the pipeline lock.
    An adapter that did not learn the word gets the word's base row there, which is what the base tokenizer would
    have looked up for it (the word is one base token, checked below), so its images are those of its own Space.
    The base row is also what LoRA scale 0 and "compare with base" use."""
    table = pipe.text_encoder.get_input_embeddings().weight
    added: dict[str, int] = getattr(pipe, "learned_word_ids", {})
    base_rows: dict[int, torch.Tensor] = getattr(pipe, "learned_word_base_rows", {})
    new_words = {}
    for word, vector in embeds.items():
        if vector.numel() != table.shape[1]:
            raise ValueError(f"Learned word '{word}' of adapter '{adapter_name}' does not fit this text encoder.")
        if word in added:
            continue
        ids = pipe.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"Learned word '{word}' of adapter '{adapter_name}' does not fit this text encoder.")
        new_words[word] = (ids[0], vector)
    if new_words:
        pipe.load_textual_inversion([{word: vector} for word, (_, vector) in new_words.items()], token=list(new_words))
        for word, token_id in zip(new_words, pipe.tokenizer.convert_tokens_to_ids(list(new_words)), strict=True):
            base_rows[token_id] = table[new_words[word][0]].clone()
            added[word] = token_id
    table = pipe.text_encoder.get_input_embeddings().weight  # one row longer per new word now
    pipe.learned_word_ids, pipe.learned_word_base_rows = added, {k: v.to(table) for k, v in base_rows.items()}
    rows: dict[str, dict[int, torch.Tensor]] = getattr(pipe, "learned_word_rows", {})
    rows[adapter_name] = {added[word]: vector.reshape(-1).to(table) for word, vector in embeds.items()}
    pipe.learned_word_rows = rows


@torch.no_grad()
def use_learned_words(pipe: DiffusionPipeline, scale: float, adapter_name: str = ADAPTER_NAME) -> None:
    """Every added word's row for `adapter_name` at the LoRA's scale: 0 gives the base model's rows (so scale 0 is
    the base model), 1 the adapter's learned ones; a word this adapter did not learn gets its base row."""
    table = pipe.text_encoder.get_input_embeddings().weight
    learned = getattr(pipe, "learned_word_rows", {}).get(adapter_name, {})
    for token_id, base_row in getattr(pipe, "learned_word_base_rows", {}).items():
        row = torch.lerp(base_row, learned[token_id], scale) if token_id in learned else base_row
        table[token_id] = row.to(table)


def randomize_seed(seed: int, randomize: bool) -> int:
    """A fresh random seed in [0, MAX_SEED] when `randomize`, else `seed` unchanged."""
    return int(np.random.default_rng().integers(0, MAX_SEED + 1)) if randomize else seed


def validate_inputs(prompt: str, seed: float, steps: float, guidance: float, lora_scale: float) -> int:
    """Raise gr.Error naming the bad input and the valid range; return the seed as an int."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error("The prompt is empty: type what the image should show, e.g. 'a red circle'.")
    try:
        seed_value = float(seed)
    except (TypeError, ValueError):
        raise gr.Error(f"Seed must be a whole number between 0 and {MAX_SEED}, got {seed!r}.") from None
    if not seed_value.is_integer() or not 0 <= seed_value <= MAX_SEED:
        raise gr.Error(f"Seed must be a whole number between 0 and {MAX_SEED}, got {seed!r}.")
    if not isinstance(steps, int | float) or not float(steps).is_integer() or not MIN_STEPS <= steps <= MAX_STEPS:
        raise gr.Error(f"Steps must be a whole number between {MIN_STEPS} and {MAX_STEPS}, got {steps!r}.")
    if not isinstance(guidance, int | float) or not MIN_GUIDANCE <= guidance <= MAX_GUIDANCE:
        raise gr.Error(f"Guidance must be between {MIN_GUIDANCE} and {MAX_GUIDANCE}, got {guidance!r}.")
    if not isinstance(lora_scale, int | float) or not MIN_LORA_SCALE <= lora_scale <= MAX_LORA_SCALE:
        raise gr.Error(f"LoRA scale must be between {MIN_LORA_SCALE} and {MAX_LORA_SCALE}, got {lora_scale!r}.")
    return int(seed_value)


def truncation_notice(prompt: str, tokenizer) -> str:
    """A message when `prompt` exceeds the text encoder's context (the pipeline silently cuts it), else ''."""
    limit = tokenizer.model_max_length
    used = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
    if used <= limit:
        return ""
    return (
        f"The prompt is {used} tokens long; the text encoder reads only {limit} "
        "(including start and end tokens), so the end of the prompt was ignored."
    )


def _sample(
    pipe, prompt: str, negative_prompt: str, seed: int, steps: int, guidance: float, on_step, done: int, total: int
) -> Image.Image:
    """One image; the generator lives on CPU so a seed gives the same noise on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def callback(pipeline, step: int, timestep, tensors: dict) -> dict:
        if on_step is not None:
            on_step(done + step + 1, total)
        return tensors

    result = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        callback_on_step_end=callback,
    )
    return result.images[0]


def generate(
    prompt: str,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    lora_scale: float = 1.0,
    compare_with_base: bool = False,
    pipe: DiffusionPipeline | None = None,
    on_step: Callable[[int, int], None] | None = None,
    adapter: str | None = None,
) -> list[Image.Image]:
    """Images for `prompt` with `adapter` (default: the first one loaded): [adapter] or, with
    `compare_with_base`, [base, adapter] from the same seed."""
    seed = validate_inputs(prompt, seed, steps, guidance, lora_scale)
    pipe = pipe if pipe is not None else get_pipeline()
    names = adapter_names(pipe)
    adapter = adapter or names[0]
    if adapter not in names:
        raise gr.Error(f"Unknown adapter {adapter!r}: choose one of {', '.join(names)}.")
    steps, guidance, lora_scale = int(steps), float(guidance), float(lora_scale)
    images, total = [], steps * (2 if compare_with_base else 1)
    # The adapter choice, its scale and its words' rows are pipeline state: they are set and used inside one hold
    # of the lock, so a request for another adapter running in parallel waits and never sees them half switched.
    with _PIPE_LOCK:
        try:
            if compare_with_base:
                pipe.disable_lora()
                use_learned_words(pipe, 0.0, adapter)
                images.append(_sample(pipe, prompt, negative_prompt, seed, steps, guidance, on_step, 0, total))
                pipe.enable_lora()
            pipe.set_adapters([adapter], adapter_weights=[lora_scale])
            use_learned_words(pipe, lora_scale, adapter)
            done = total - steps
            images.append(_sample(pipe, prompt, negative_prompt, seed, steps, guidance, on_step, done, total))
        finally:
            # Leave the shared pipeline in its default state whatever happened above.
            pipe.enable_lora()
            use_learned_words(pipe, 1.0, names[0])
            pipe.set_adapters([names[0]], adapter_weights=[1.0])
    return images


def adapter_names(pipe: DiffusionPipeline) -> list[str]:
    """The adapters `load_pipeline` attached, the default first (ADAPTER_NAME for a pipeline built elsewhere)."""
    return list(getattr(pipe, "space_adapters", None) or [ADAPTER_NAME])


_PIPELINE: DiffusionPipeline | None = None


def get_pipeline() -> DiffusionPipeline:
    """The process-wide pipeline, loaded once from the environment settings."""
    global _PIPELINE
    if _PIPELINE is None:
        _PIPELINE = load_pipeline(default_base(), pipeline_adapters())
    return _PIPELINE


def pipeline_adapters() -> str | list[tuple[str, str]]:
    """What `load_pipeline` takes from the environment: LORA_ADAPTERS as a list, else the one LORA_ADAPTER."""
    adapters = configured_adapters()
    return adapters if os.environ.get("LORA_ADAPTERS", "").strip() else adapters[0][1]


def display_name(reference: str) -> str:
    """A Hub id as is; a local folder relative to the repository when inside it (shorter, and no home path)."""
    path = Path(reference).expanduser().resolve()
    if not path.exists():
        return reference
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return path.name


def load_examples() -> list[str]:
    """Example prompts from the adapter's domain: short ones, then the embedded prompt file's, else a fixed list."""
    if EMBEDDED_PROMPTS.is_file():
        lines = [line.strip() for line in EMBEDDED_PROMPTS.read_text().splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        if prompts:
            return list(dict.fromkeys([*SHORT_EXAMPLES, *prompts[:4]]))
    return list(FALLBACK_EXAMPLES)


def build_demo(
    pipe: DiffusionPipeline | None = None, base: str = "", adapter: str | Sequence[tuple[str, str]] = ""
) -> gr.Blocks:
    """The Blocks UI around `generate`; `pipe` defaults to the one loaded from the environment. `adapter` is
    the one adapter's reference or [(name, reference)] for the header."""
    pipe = pipe if pipe is not None else get_pipeline()
    device = pipe.device.type
    names = adapter_names(pipe)

    # Gradio finds the progress tracker by its default value, so the call in the signature is intended.
    def run(
        prompt,
        negative_prompt,
        seed,
        randomize,
        steps,
        guidance,
        lora_scale,
        compare,
        adapter=names[0],
        progress=gr.Progress(),  # noqa: B008
    ):
        """UI handler: pick the seed, warn about truncation, generate with the chosen adapter, report the seed."""
        if randomize:
            seed = randomize_seed(0, True)
        seed = validate_inputs(prompt, seed, steps, guidance, lora_scale)
        notice = truncation_notice(prompt, pipe.tokenizer)
        if notice:
            gr.Warning(notice)
        progress(0, desc="Starting")
        images = generate(
            prompt,
            negative_prompt,
            seed,
            steps,
            guidance,
            lora_scale,
            compare_with_base=compare,
            pipe=pipe,
            on_step=lambda done, total: progress((done, total), desc="Denoising", unit="steps"),
            adapter=adapter,
        )
        info = f"Seed used: **{seed}**" + (f"\n\n⚠️ {notice}" if notice else "")
        label = f"adapter {adapter} (scale {lora_scale:g})" if len(names) > 1 else f"adapter (scale {lora_scale:g})"
        gallery = [(images[0], "base model"), (images[1], label)] if compare else []
        return images[-1], gallery, seed, info

    base_name = display_name(base or pipe.name_or_path)
    if isinstance(adapter, str):
        adapters_text = f"adapter: `{display_name(adapter or ADAPTER_NAME)}`"
    else:
        adapters_text = "adapters: " + ", ".join(f"`{name}` ({display_name(ref)})" for name, ref in adapter)
    with gr.Blocks(title="LoRA text-to-image") as demo:
        gr.Markdown(f"# LoRA text-to-image\nBase model: `{base_name}` · {adapters_text} · sampler: DPM-Solver++")
        if device == "cpu":
            gr.Markdown("ℹ️ Running on **CPU**: generation is slow for full-size models; use few steps.")
        # One adapter: the dropdown stays hidden but still gives the API its `adapter` parameter and default.
        adapter_choice = gr.Dropdown(
            choices=names, value=names[0], label="Adapter", visible=len(names) > 1, interactive=True
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="a red circle on a white background", scale=4)
            run_button = gr.Button("Run", variant="primary", scale=1)
        result = gr.Image(label="Result", type="pil", format="png", height=320, elem_id="result")
        info = gr.Markdown("Seed used: —", label="Info", show_label=False)
        gallery = gr.Gallery(
            label="Base vs adapter", columns=2, format="png", height=320, visible=False, elem_id="compare"
        )
        compare = gr.Checkbox(label="Compare with base model (same seed, side by side)", value=False)
        with gr.Accordion("Advanced", open=False):
            # A value (even empty) is the API's default: `Client(url).predict("a prompt", api_name="/generate")` works.
            negative_prompt = gr.Textbox(
                label="Negative prompt", value="", placeholder="what the image should not show"
            )
            with gr.Row():
                # No minimum/maximum here: validate_inputs gives a message that names the seed and its range.
                seed = gr.Number(label="Seed", value=0, precision=None)
                randomize = gr.Checkbox(label="Randomize seed", value=True)
            with gr.Row():
                steps = gr.Slider(MIN_STEPS, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps")
                guidance = gr.Slider(MIN_GUIDANCE, MAX_GUIDANCE, value=DEFAULT_GUIDANCE, step=0.5, label="Guidance")
                lora_scale = gr.Slider(
                    MIN_LORA_SCALE, MAX_LORA_SCALE, value=1.0, step=0.05, label="LoRA scale (0 = base model)"
                )
        gr.Examples(examples=[[text] for text in load_examples()], inputs=[prompt], label="Examples")

        compare.change(lambda on: gr.Gallery(visible=on), inputs=compare, outputs=gallery, api_name=False)
        # The adapter comes last so positional API calls written for the single-adapter Space keep working.
        inputs = [prompt, negative_prompt, seed, randomize, steps, guidance, lora_scale, compare, adapter_choice]
        gr.on(
            triggers=[run_button.click, prompt.submit],
            fn=run,
            inputs=inputs,
            outputs=[result, gallery, seed, info],
            api_name="generate",
        )
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


def main() -> None:
    """Load the pipeline from the environment settings and serve the demo."""
    global _PIPELINE
    try:
        base, adapter = default_base(), pipeline_adapters()
        _PIPELINE = load_pipeline(base, adapter)
    except (RuntimeError, FileNotFoundError, ValueError) as error:
        # A one-line reason in the Space logs instead of a traceback through gradio.
        raise SystemExit(f"error: {error}") from None
    demo = build_demo(_PIPELINE, base=base, adapter=adapter)
    # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are read by gradio itself when these are None.
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME"), server_port=None, css=CSS)


if __name__ == "__main__":
    main()
