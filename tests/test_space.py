"""Fast tests of space/: generate(), validation, the folder's self-containment, and deploy.py with a fake HfApi."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SPACE_DIR = REPO_ROOT / "space"
EMBEDDED_PIPELINE = REPO_ROOT / "embedded" / "pipeline"
EMBEDDED_ADAPTER = REPO_ROOT / "embedded" / "demo_adapter"
FAST_STEPS = 3


def load_space_module(name: str):
    """Import space/<name>.py under a unique module name (the folder is not a package, by design)."""
    module_name = f"space_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, SPACE_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def make_tiny_adapter(base_dir: Path, out_dir: Path) -> Path:
    """Save a random (non-zero) rank-4 UNet LoRA for the pipeline in `base_dir`, in diffusers format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, use_safetensors=True)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter visibly changes the output.
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    pipe.unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir


def demo_models(tmp_path_factory) -> tuple[str, str]:
    """Base and adapter for the tests: SPACE_TEST_BASE/SPACE_TEST_ADAPTER if set (e.g. to refresh the docs screenshot),
    else the embedded pipeline and demo adapter, else the embedded pipeline or the tiny fixture with a random LoRA."""
    if os.environ.get("SPACE_TEST_BASE") and os.environ.get("SPACE_TEST_ADAPTER"):
        return os.environ["SPACE_TEST_BASE"], os.environ["SPACE_TEST_ADAPTER"]
    if EMBEDDED_PIPELINE.is_dir() and EMBEDDED_ADAPTER.is_dir():
        return str(EMBEDDED_PIPELINE), str(EMBEDDED_ADAPTER)
    if EMBEDDED_PIPELINE.is_dir():
        base = EMBEDDED_PIPELINE
    else:
        from conftest import make_tiny_pipeline

        base = make_tiny_pipeline(tmp_path_factory.mktemp("space_base"))
    return str(base), str(make_tiny_adapter(base, tmp_path_factory.mktemp("space_adapter")))


def make_variant_adapter(adapter_dir: str | Path, out_dir: Path, seed: int = 1, words: bool = True) -> Path:
    """A second adapter for the same base, made deterministically: every LoRA tensor of `adapter_dir` nudged by
    seeded noise of its own spread, and (with `words`) the same learned words with other vectors, so that the two
    adapters share a word, as two adapters trained for one concept would."""
    from safetensors.torch import load_file, save_file

    source = Path(adapter_dir)
    generator = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = load_file(source / "pytorch_lora_weights.safetensors")
    nudged = {key: value + value.std() * torch.randn(value.shape, generator=generator) for key, value in lora.items()}
    save_file(nudged, str(out_dir / "pytorch_lora_weights.safetensors"))
    embeds = source / "learned_embeds.safetensors"
    if words and embeds.is_file():
        learned = load_file(embeds)
        other = {
            word: vector.norm() * torch.nn.functional.normalize(torch.randn(vector.shape, generator=generator), dim=-1)
            for word, vector in learned.items()
        }
        save_file(other, str(out_dir / "learned_embeds.safetensors"))
    return out_dir


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def app():
    return load_space_module("app")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    return demo_models(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(app, models):
    return app.load_pipeline(*models, device="cpu")


def test_load_pipeline_uses_dpm_solver_fp32_and_adapter(app, pipe):
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert app.ADAPTER_NAME in pipe.get_list_adapters()["unet"]


def test_lora_weight_name_from_env_and_safetensors_only(app, models, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    weights = Path(models[1]) / "pytorch_lora_weights.safetensors"
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(weights, renamed / "my_style.safetensors")
    monkeypatch.setenv("LORA_WEIGHT_NAME", "my_style.safetensors")
    pipe = app.load_pipeline(models[0], str(renamed), device="cpu")
    assert app.ADAPTER_NAME in pipe.get_list_adapters()["unet"]
    # A pickled adapter is refused even when it is the only file present.
    monkeypatch.delenv("LORA_WEIGHT_NAME")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(weights), pickled / "pytorch_lora_weights.bin")
    with pytest.raises(OSError, match="pytorch_lora_weights.safetensors"):
        app.load_pipeline(models[0], str(pickled), device="cpu")


def test_missing_local_folders_fail_early_with_the_setting_named(app, models, tmp_path):
    with pytest.raises(FileNotFoundError, match="LORA_ADAPTER .* does not exist"):
        app.load_pipeline(models[0], str(tmp_path / "no_adapter"), device="cpu")
    with pytest.raises(FileNotFoundError, match="BASE_MODEL .* does not exist"):
        app.load_pipeline("./no/such/base", models[1], device="cpu")


def test_generate_returns_image_of_pipeline_size(app, pipe):
    images = app.generate("a red circle on a white background", "", 1, FAST_STEPS, 5.0, 1.0, pipe=pipe)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert len(images) == 1 and images[0].size == (side, side)
    assert pixels(images[0]).std() > 0


def test_same_seed_same_image_and_different_seed_different_image(app, pipe):
    first = app.generate("a blue square", seed=7, steps=FAST_STEPS, pipe=pipe)[0]
    again = app.generate("a blue square", seed=7, steps=FAST_STEPS, pipe=pipe)[0]
    other = app.generate("a blue square", seed=8, steps=FAST_STEPS, pipe=pipe)[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


def plain_base_image(base_dir: str, prompt: str, seed: int, guidance: float):
    """The reference: a plain base pipeline that never saw the adapter, built here and not by the app."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(base_dir, use_safetensors=True)
    base.scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler.config, algorithm_type="dpmsolver++")
    generator = torch.Generator().manual_seed(seed)
    return base(prompt, num_inference_steps=FAST_STEPS, guidance_scale=guidance, generator=generator).images[0]


def test_lora_scale_zero_equals_base_model(app, pipe, models):
    prompt, seed = "a green circle", 3
    scale_zero = app.generate(prompt, seed=seed, steps=FAST_STEPS, lora_scale=0.0, pipe=pipe)[0]
    adapter = app.generate(prompt, seed=seed, steps=FAST_STEPS, lora_scale=1.0, pipe=pipe)[0]
    reference = plain_base_image(models[0], prompt, seed, app.DEFAULT_GUIDANCE)
    assert np.array_equal(pixels(scale_zero), pixels(reference))
    assert not np.array_equal(pixels(adapter), pixels(reference)), "the adapter should change the image"


def test_compare_with_base_gives_base_and_adapter_from_same_seed(app, pipe):
    base, adapter = app.generate(
        "a red square", seed=5, steps=FAST_STEPS, lora_scale=1.0, compare_with_base=True, pipe=pipe
    )
    assert np.array_equal(
        pixels(base), pixels(app.generate("a red square", seed=5, steps=FAST_STEPS, lora_scale=0.0, pipe=pipe)[0])
    )
    assert np.array_equal(
        pixels(adapter), pixels(app.generate("a red square", seed=5, steps=FAST_STEPS, pipe=pipe)[0])
    )
    # The shared pipeline is back at full adapter strength afterwards.
    assert pipe.get_active_adapters() == [app.ADAPTER_NAME]


@pytest.fixture(scope="module")
def learned_word_models(tiny_pipeline_dir, tmp_path_factory) -> tuple[str, str, torch.Tensor]:
    """The tiny base, and a random LoRA saved with a learned vector for the word "blue" beside it."""
    from safetensors.torch import save_file

    adapter = make_tiny_adapter(tiny_pipeline_dir, tmp_path_factory.mktemp("learned_word_adapter"))
    vector = torch.randn(16, generator=torch.Generator().manual_seed(1))
    save_file({"blue": vector}, str(adapter / "learned_embeds.safetensors"))
    return str(tiny_pipeline_dir), str(adapter), vector


def test_learned_word_is_loaded_and_scale_zero_or_comparison_is_the_base(app, learned_word_models):
    base_dir, adapter_dir, vector = learned_word_models
    pipe = app.load_pipeline(base_dir, adapter_dir, device="cpu")
    table = pipe.text_encoder.get_input_embeddings().weight
    blue = pipe.tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    assert torch.equal(table[blue], vector)
    prompt, seed = "a blue circle", 2
    reference = plain_base_image(base_dir, prompt, seed, app.DEFAULT_GUIDANCE)
    scale_zero = app.generate(prompt, seed=seed, steps=FAST_STEPS, lora_scale=0.0, pipe=pipe)[0]
    compared, adapted = app.generate(prompt, seed=seed, steps=FAST_STEPS, compare_with_base=True, pipe=pipe)
    assert np.array_equal(pixels(scale_zero), pixels(reference))  # the word's base row, too, at scale 0
    assert np.array_equal(pixels(compared), pixels(reference))
    assert not np.array_equal(pixels(adapted), pixels(reference))
    assert torch.equal(table[blue], vector)  # back to the learned word for the next request


def test_space_file_names_agree_with_lorakit(app):
    """The Space is deployed alone (no lorakit import), so it carries its own copy of the name."""
    from lorakit.filenames import LEARNED_EMBEDS_FILE

    assert app.LEARNED_EMBEDS_FILE == LEARNED_EMBEDS_FILE


def test_learned_embeds_file_locally_and_from_a_fake_hub(app, learned_word_models, tmp_path):
    from huggingface_hub.errors import EntryNotFoundError

    _, adapter_dir, _ = learned_word_models
    assert app.learned_embeds_file(adapter_dir) == str(Path(adapter_dir) / app.LEARNED_EMBEDS_FILE)
    assert app.learned_embeds_file(str(tmp_path)) is None  # a folder without learned words

    class FakeApi:
        def __init__(self, present: bool):
            self.present, self.asked = present, []

        def hf_hub_download(self, repo_id, filename):
            self.asked.append((repo_id, filename))
            if not self.present:
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            return f"/cache/{repo_id}/{filename}"

    with_words, without = FakeApi(True), FakeApi(False)
    assert app.learned_embeds_file("alice/lora", api=with_words) == "/cache/alice/lora/learned_embeds.safetensors"
    assert with_words.asked == [("alice/lora", "learned_embeds.safetensors")]
    assert app.learned_embeds_file("alice/lora", api=without) is None


def test_progress_callback_counts_every_step(app, pipe):
    calls = []
    app.generate(
        "a red circle",
        seed=0,
        steps=FAST_STEPS,
        compare_with_base=True,
        pipe=pipe,
        on_step=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(step, 2 * FAST_STEPS) for step in range(1, 2 * FAST_STEPS + 1)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   \n\t"}, "prompt is empty"),
        ({"steps": 0}, "Steps must be"),
        ({"steps": 1000}, "Steps must be"),
        ({"steps": 2.5}, "Steps must be"),
        ({"guidance": -1.0}, "Guidance must be"),
        ({"guidance": 99.0}, "Guidance must be"),
        ({"seed": 1.5}, "Seed must be a whole number"),
        ({"seed": "abc"}, "Seed must be a whole number"),
        ({"seed": -3}, "Seed must be a whole number"),
        ({"seed": None}, "Seed must be a whole number"),
        ({"lora_scale": 2.0}, "LoRA scale must be"),
    ],
)
def test_invalid_inputs_raise_clear_gr_error_before_sampling(app, kwargs, message):
    class ExplodingPipe:
        def __getattr__(self, name):
            raise AssertionError("validation must fail before the pipeline is touched")

    arguments = {"prompt": "a red circle", "seed": 0, "steps": FAST_STEPS, "guidance": 5.0, "lora_scale": 1.0}
    with pytest.raises(gr.Error, match=message):
        app.generate(**{**arguments, **kwargs}, pipe=ExplodingPipe())


def test_long_prompt_gets_truncation_notice_and_still_generates(app, pipe):
    limit = pipe.tokenizer.model_max_length
    long_prompt = " ".join(["red circle"] * limit)
    notice = app.truncation_notice(long_prompt, pipe.tokenizer)
    assert f"only {limit}" in notice and "ignored" in notice
    assert app.truncation_notice("a red circle", pipe.tokenizer) == ""
    assert app.generate(long_prompt, seed=0, steps=1, pipe=pipe)[0].size[0] > 0


def test_randomize_seed(app):
    assert app.randomize_seed(42, False) == 42
    seeds = {app.randomize_seed(42, True) for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= seed <= app.MAX_SEED for seed in seeds)


def test_defaults_without_env_point_at_embedded_or_explain(app, monkeypatch):
    for key in ("BASE_MODEL", "LORA_ADAPTER", "LORA_WEIGHT_NAME"):
        monkeypatch.delenv(key, raising=False)
    expected_base = str(EMBEDDED_PIPELINE) if EMBEDDED_PIPELINE.is_dir() else app.HUB_DEFAULT_BASE
    assert app.default_base() == expected_base
    if EMBEDDED_ADAPTER.is_dir():
        assert app.default_adapter() == str(EMBEDDED_ADAPTER)
    else:
        with pytest.raises(RuntimeError, match="set LORA_ADAPTER"):
            app.default_adapter()
    monkeypatch.setenv("BASE_MODEL", "someone/base")
    monkeypatch.setenv("LORA_ADAPTER", "someone/adapter")
    assert (app.default_base(), app.default_adapter()) == ("someone/base", "someone/adapter")


def test_main_exits_with_one_line_reason_on_bad_settings(app, monkeypatch, tmp_path):
    monkeypatch.setenv("BASE_MODEL", str(tmp_path / "missing_base"))
    monkeypatch.setenv("LORA_ADAPTER", "someone/adapter")
    with pytest.raises(SystemExit, match="error: BASE_MODEL .*missing_base.* does not exist"):
        app.main()


def test_examples_come_from_the_adapter_domain(app):
    examples = app.load_examples()
    prompts_file = REPO_ROOT / "embedded" / "prompts" / "adapter.txt"
    assert examples and all(isinstance(text, str) and text.strip() for text in examples)
    assert examples[: len(app.SHORT_EXAMPLES)] == app.SHORT_EXAMPLES  # short prompts, as people type them
    assert any(len(text.split()) <= 3 for text in examples)
    if prompts_file.is_file():
        assert examples[-1] in prompts_file.read_text()
    else:
        assert examples == app.FALLBACK_EXAMPLES


def test_demo_exposes_generate_api(app, pipe):
    demo = app.build_demo(pipe, base="base", adapter="adapter")
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert "generate" in api_names
    assert demo._queue.max_size == app.QUEUE_MAX_SIZE


# ---- several adapters on one base (LORA_ADAPTERS) ----


def test_lora_adapters_parse_names_and_default_names(app):
    parsed = app.parse_adapters(" purple = embedded/demo_adapter , alice/lora,./runs/my-style/ ,x=/abs/path=odd")
    assert parsed == [
        ("purple", "embedded/demo_adapter"),
        ("lora", "alice/lora"),  # a name defaults to the reference's last part
        ("my-style", "./runs/my-style/"),
        ("x", "/abs/path=odd"),  # split at the first '=': a folder may hold one, a name cannot
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "LORA_ADAPTERS has an empty entry"),
        ("a/b,,c/d", "LORA_ADAPTERS has an empty entry"),
        ("a/b,", "LORA_ADAPTERS has an empty entry"),
        ("purple=", "LORA_ADAPTERS entry 'purple=' has no adapter"),
        ("one/lora,two/lora", "LORA_ADAPTERS names two adapters 'lora'"),
        ("my.style=alice/lora", "LORA_ADAPTERS entry 'my.style=alice/lora': the name 'my.style' must be"),
        ("alice/lora.v2", "LORA_ADAPTERS entry 'alice/lora.v2': the name 'lora.v2' must be"),
    ],
)
def test_lora_adapters_bad_entries_name_the_variable(app, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        app.parse_adapters(value)


def test_lora_adapters_wins_over_lora_adapter_and_single_path_is_unchanged(app, monkeypatch):
    for key in ("LORA_ADAPTERS", "LORA_ADAPTER"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LORA_ADAPTER", "someone/adapter")
    # One adapter: the same reference string as before, loaded under ADAPTER_NAME.
    assert app.configured_adapters() == [(app.ADAPTER_NAME, "someone/adapter")]
    assert app.pipeline_adapters() == "someone/adapter"
    monkeypatch.setenv("LORA_ADAPTERS", "a=alice/one,bob/two")
    assert app.configured_adapters() == [("a", "alice/one"), ("two", "bob/two")]
    assert app.pipeline_adapters() == [("a", "alice/one"), ("two", "bob/two")]


def test_main_exits_with_one_line_reason_on_bad_lora_adapters(app, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ADAPTERS", "purple=")
    with pytest.raises(SystemExit, match="error: LORA_ADAPTERS entry 'purple=' has no adapter"):
        app.main()
    monkeypatch.setenv("LORA_ADAPTERS", f"gone={tmp_path / 'missing'}")
    with pytest.raises(SystemExit, match="error: LORA_ADAPTERS .*missing.* does not exist"):
        app.main()


@pytest.fixture(scope="module")
def variant_adapters(models, tmp_path_factory) -> tuple[str, str]:
    """A second adapter sharing the demo's learned word with another vector, and a third that learned no word."""
    second = make_variant_adapter(models[1], tmp_path_factory.mktemp("variant") / "demo_adapter_variant", seed=1)
    wordless = make_variant_adapter(models[1], tmp_path_factory.mktemp("wordless") / "wordless", seed=2, words=False)
    return str(second), str(wordless)


@pytest.fixture(scope="module")
def multi_pipe(app, models, variant_adapters):
    first, (second, wordless) = models[1], variant_adapters
    return app.load_pipeline(models[0], [("first", first), ("second", second), ("wordless", wordless)], device="cpu")


def test_several_adapters_load_once_on_one_base_and_each_matches_its_own_space(
    app, models, multi_pipe, variant_adapters
):
    assert multi_pipe.space_adapters == ["first", "second", "wordless"]
    assert set(multi_pipe.get_list_adapters()["unet"]) == {"first", "second", "wordless"}
    prompt, seed = "a purple star on a white background", 4
    for name, reference in zip(multi_pipe.space_adapters, [models[1], *variant_adapters], strict=True):
        single = app.load_pipeline(models[0], reference, device="cpu")
        expected = app.generate(prompt, seed=seed, steps=FAST_STEPS, pipe=single)[0]
        served = app.generate(prompt, seed=seed, steps=FAST_STEPS, pipe=multi_pipe, adapter=name)[0]
        assert np.array_equal(pixels(served), pixels(expected)), name
        # Scale 0 and "compare with base" are the base model whatever the adapter (its words back at base rows).
        base, adapted = app.generate(
            prompt, seed=seed, steps=FAST_STEPS, compare_with_base=True, pipe=multi_pipe, adapter=name
        )
        assert np.array_equal(pixels(adapted), pixels(expected))
        assert np.array_equal(pixels(base), pixels(plain_base_image(models[0], prompt, seed, app.DEFAULT_GUIDANCE)))
    first, second = (
        app.generate(prompt, seed=seed, steps=FAST_STEPS, pipe=multi_pipe, adapter=name)[0]
        for name in ("first", "second")
    )
    assert not np.array_equal(pixels(first), pixels(second)), "the fixture's two adapters should draw differently"


def test_shared_learned_word_is_one_token_with_a_row_per_adapter(app, models, multi_pipe, variant_adapters):
    from safetensors.torch import load_file

    words = {
        name: load_file(Path(ref) / app.LEARNED_EMBEDS_FILE)
        for name, ref in (("first", models[1]), ("second", variant_adapters[0]))
        if (Path(ref) / app.LEARNED_EMBEDS_FILE).is_file()
    }
    assert set(words) == {"first", "second"}, "both adapters learned a word (the demo adapter's purple)"
    table = multi_pipe.text_encoder.get_input_embeddings().weight
    for word in words["first"]:
        (token_id,) = multi_pipe.tokenizer(word, add_special_tokens=False)["input_ids"]
        assert token_id == multi_pipe.learned_word_ids[word]  # added once, not once per adapter
        assert not torch.equal(words["first"][word], words["second"][word])
        # Between requests the default (first) adapter's vector is in place, whichever adapter ran last.
        app.generate("a purple circle", seed=0, steps=1, pipe=multi_pipe, adapter="second")
        assert torch.equal(table[token_id], words["first"][word])
        assert multi_pipe.get_active_adapters() == ["first"]
        app.use_learned_words(multi_pipe, 1.0, "second")
        assert torch.equal(table[token_id], words["second"][word])
        app.use_learned_words(multi_pipe, 1.0, "wordless")
        assert torch.equal(table[token_id], multi_pipe.learned_word_base_rows[token_id])
        app.use_learned_words(multi_pipe, 1.0, "first")


def test_unknown_adapter_is_a_clear_error_and_default_is_the_first(app, multi_pipe, pipe):
    with pytest.raises(gr.Error, match="Unknown adapter 'nope': choose one of first, second, wordless"):
        app.generate("a red circle", seed=0, steps=1, pipe=multi_pipe, adapter="nope")
    default = app.generate("a red circle", seed=6, steps=FAST_STEPS, pipe=multi_pipe)[0]
    first = app.generate("a red circle", seed=6, steps=FAST_STEPS, pipe=multi_pipe, adapter="first")[0]
    assert np.array_equal(pixels(default), pixels(first))
    # A single-adapter pipeline answers to ADAPTER_NAME, and to no adapter at all, as before.
    assert app.adapter_names(pipe) == [app.ADAPTER_NAME]
    with pytest.raises(gr.Error, match="Unknown adapter"):
        app.generate("a red circle", seed=0, steps=1, pipe=pipe, adapter="first")


def api_parameters(demo: gr.Blocks) -> list[dict]:
    return demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]


def test_dropdown_lists_the_adapters_and_the_api_takes_adapter_last_with_a_default(app, multi_pipe, pipe, models):
    multi = app.build_demo(multi_pipe, base="base", adapter=[("first", models[1]), ("second", "alice/lora")])
    (dropdown,) = [block for block in multi.blocks.values() if isinstance(block, gr.Dropdown)]
    assert dropdown.visible and dropdown.value == "first" and dropdown.label == "Adapter"
    assert [choice[1] for choice in dropdown.choices] == ["first", "second", "wordless"]
    parameters = api_parameters(multi)
    assert parameters[-1]["parameter_name"] == "adapter" and parameters[-1]["parameter_default"] == "first"
    assert [p["parameter_name"] for p in parameters if not p["parameter_has_default"]] == ["prompt"]
    single = app.build_demo(pipe, base="base", adapter="adapter")
    (hidden,) = [block for block in single.blocks.values() if isinstance(block, gr.Dropdown)]
    assert not hidden.visible and hidden.value == app.ADAPTER_NAME
    single_names = [p["parameter_name"] for p in api_parameters(single)]
    assert single_names[:8] == [p["parameter_name"] for p in parameters][:8] and single_names[-1] == "adapter"


# ---- the folder deploys on its own ----

ALLOWED_IMPORTS = {
    "__future__", "argparse", "collections", "importlib", "os", "pathlib", "re", "shutil", "sys", "tempfile",
    "threading", "typing", "warnings",
    # pip packages, each listed in space/requirements.txt
    "diffusers", "gradio", "huggingface_hub", "numpy", "packaging", "PIL", "safetensors", "torch",
}  # fmt: skip


@pytest.mark.parametrize("name", ["app.py", "deploy.py"])
def test_space_imports_only_stdlib_and_requirements(name):
    tree = ast.parse((SPACE_DIR / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break when the folder is uploaded alone"
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, f"unexpected imports: {imported - ALLOWED_IMPORTS}"
    requirements = (SPACE_DIR / "requirements.txt").read_text().lower()
    for package in imported & {"diffusers", "gradio", "huggingface_hub", "numpy", "packaging", "safetensors", "torch"}:
        assert package in requirements


def test_requirements_cover_runtime_without_cpu_pins():
    lines = [line.split("#")[0].strip() for line in (SPACE_DIR / "requirements.txt").read_text().splitlines()]
    names = {line.split(">")[0].split("<")[0].split("=")[0].strip().lower() for line in lines if line}
    assert {"diffusers", "transformers", "peft", "accelerate", "torch", "safetensors", "gradio"} <= names
    assert not any("+cpu" in line or "download.pytorch.org" in line or "==" in line for line in lines)


def _requirements(path: Path) -> dict[str, str]:
    """{package: version specifier} of a requirements file (comments, options and -r lines left out)."""
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    found = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {requirement.name.lower(): str(requirement.specifier) for requirement in found}


def test_space_requirements_use_the_root_bounds():
    space, root = _requirements(SPACE_DIR / "requirements.txt"), _requirements(REPO_ROOT / "requirements.txt")
    shared = sorted(set(space) & set(root))
    assert {"torch", "diffusers", "transformers", "peft"} <= set(shared)
    assert {name: space[name] for name in shared} == {name: root[name] for name in shared}


def test_readme_front_matter_describes_the_space():
    text = (SPACE_DIR / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["sdk"] == "gradio" and (SPACE_DIR / meta["app_file"]).is_file()
    assert meta["sdk_version"].split(".")[0] == gr.__version__.split(".")[0]
    assert str(meta["python_version"]).startswith("3.")
    assert len(meta["models"]) == 2 and meta["license"]
    assert 0 < len(meta["short_description"]) <= 60  # the Hub rejects longer descriptions


# ---- deploy.py against a fake HfApi ----


class FakeHfApi:
    """Records every call and snapshots uploaded folders (the staging directory is deleted afterwards)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        return f"https://huggingface.co/spaces/{repo_id}"

    def add_space_variable(self, repo_id, key, value, **kwargs):
        self.calls.append(("add_space_variable", (repo_id, key, value), kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        root = Path(kwargs["folder_path"])
        self.uploaded = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def named(self, name):
        return [call for call in self.calls if call[0] == name]


@pytest.fixture()
def deploy_module():
    return load_space_module("deploy")


def test_deploy_creates_gradio_space_and_uploads_folder_with_adapter(deploy_module, tmp_path):
    api = FakeHfApi()
    url = deploy_module.deploy(
        "alice/shapes-demo", "alice/shapes-lora", base="nota-ai/bk-sdm-tiny", private=True, api=api
    )
    assert url.endswith("alice/shapes-demo")
    ((_, args, kwargs),) = api.named("create_repo")
    assert args == ("alice/shapes-demo",)
    assert (
        kwargs["repo_type"] == "space" and kwargs["space_sdk"] == "gradio" and kwargs["exist_ok"] and kwargs["private"]
    )
    variables = {args[1]: args[2] for _, args, _ in api.named("add_space_variable")}
    assert variables == {"LORA_ADAPTER": "alice/shapes-lora", "BASE_MODEL": "nota-ai/bk-sdm-tiny"}
    ((_, _, upload),) = api.named("upload_folder")
    assert upload["repo_id"] == "alice/shapes-demo" and upload["repo_type"] == "space"
    assert {"app.py", "requirements.txt", "README.md"} <= set(api.uploaded)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in api.uploaded)
    meta = yaml.safe_load(api.uploaded["README.md"].decode().split("---")[1])
    assert meta["models"] == ["nota-ai/bk-sdm-tiny", "alice/shapes-lora"] and meta["sdk"] == "gradio"
    assert api.uploaded["app.py"] == (SPACE_DIR / "app.py").read_bytes()
    # Variables are set before the upload that triggers the Space build.
    assert [call[0] for call in api.calls][-1] == "upload_folder"


def test_deploy_never_writes_or_prints_the_token(deploy_module, monkeypatch, capsys, tmp_path):
    secret = "hf_secret_test_value"
    monkeypatch.setenv("HF_TOKEN", secret)
    # A stray env file in the folder must not be shipped either.
    space_copy = tmp_path / "space"
    deploy_module.shutil.copytree(SPACE_DIR, space_copy, ignore=deploy_module.shutil.ignore_patterns("__pycache__"))
    (space_copy / ".env").write_text(f"HF_TOKEN={secret}\n")
    api = FakeHfApi()
    argv = ["--space_id", "alice/demo", "--lora", "alice/lora", "--weight_name", "w.safetensors"]
    code = deploy_module.main(argv, api=api, space_dir=space_copy)
    out = capsys.readouterr()
    assert code == 0 and "alice/demo" in out.out
    assert secret not in repr(api.calls) and secret not in out.out + out.err
    assert api.uploaded and not any(secret.encode() in data for data in api.uploaded.values())
    assert ".env" not in api.uploaded
    assert ("add_space_variable", ("alice/demo", "LORA_WEIGHT_NAME", "w.safetensors")) in [c[:2] for c in api.calls]
    assert not any("token" in kwargs for _, _, kwargs in api.calls)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--space_id", "no-namespace", "--lora", "alice/lora"], "--space_id must be a Hub repo id"),
        (["--space_id", "alice/demo", "--lora", "bad id/with space"], "--lora must be a Hub repo id"),
        (["--space_id", "alice/demo", "--lora", "SPACE_DIR"], "is a local path"),
    ],
)
def test_deploy_rejects_bad_ids_before_calling_the_hub(deploy_module, capsys, argv, message):
    argv = [str(SPACE_DIR) if arg == "SPACE_DIR" else arg for arg in argv]
    api = FakeHfApi()
    assert deploy_module.main(argv, api=api) == 2
    assert message in capsys.readouterr().err
    assert api.calls == []


def test_render_readme_replaces_models_only(deploy_module):
    text = "---\nsdk: gradio\nmodels:\n  - old/base\n  - old/lora\nlicense: mit\n---\n# Title\n"
    rendered = deploy_module.render_readme(text, "new/base", "new/lora")
    meta = yaml.safe_load(rendered.split("---")[1])
    assert meta == {"sdk": "gradio", "license": "mit", "models": ["new/base", "new/lora"]}
    assert rendered.endswith("# Title\n")
    with pytest.raises(ValueError, match="front matter"):
        deploy_module.render_readme("# no front matter\n", "a/b", "c/d")
