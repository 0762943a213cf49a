"""The docs stay true: numbers match the result files, links resolve, images are generated, snippets run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "docs"))

from docgen import sources  # noqa: E402
from docgen.render import RENDERERS  # noqa: E402

from lorakit.markdown import block_names  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load("docs_build", REPO / "docs" / "build.py")
DOCS = [REPO / name for name in build.DOC_FILES]
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"```(?P<lang>\w*)\n(?P<body>.*?)```", re.DOTALL)
REQUIRED_EXTERNAL = (
    "https://arxiv.org/abs/2305.15798",
    "https://github.com/Nota-NetsPresso/BK-SDM",
    "https://arxiv.org/abs/2106.09685",
    "https://huggingface.co/datasets/lambdalabs/naruto-blip-captions",
)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _links(path: Path) -> list[str]:
    """Link and image targets of a Markdown file, code blocks excluded."""
    return [m.group("target") for m in LINK.finditer(FENCE.sub("", _text(path)))]


def _blocks(lang: str) -> list[tuple[Path, str]]:
    return [(doc, m.group("body")) for doc in DOCS for m in FENCE.finditer(_text(doc)) if m.group("lang") == lang]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --- generated blocks ----------------------------------------------------------------------------------------


def test_generated_blocks_are_up_to_date():
    """Re-rendering every block from the result files gives the committed text (run `python docs/build.py`)."""
    assert build.stale_files() == []


def test_every_page_has_generated_numbers_and_every_renderer_is_used():
    used = {name for doc in DOCS for name in block_names(_text(doc))}
    assert all(block_names(_text(doc)) for doc in DOCS)
    assert used == set(RENDERERS), f"renderers never used: {set(RENDERERS) - used}"


def test_measured_looking_numbers_appear_only_inside_generated_blocks():
    """Decimals, thousands and percentages in prose would be typed by hand: they must come from a block."""
    figure = re.compile(r"(?<![\w.:/-])(\d+\.\d+|\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)? ?%)(?![\w.])")
    for doc in DOCS:
        prose = re.sub(r"<!-- generated:([\w-]+) -->.*?<!-- /generated:\1 -->", "", _text(doc), flags=re.DOTALL)
        prose = LINK.sub("", FENCE.sub("", prose))
        prose = re.sub(r"`[^`]*`", "", prose)  # commands and identifiers
        assert figure.findall(prose) == [], f"{doc.name}: numbers outside generated blocks"


@pytest.mark.slow
def test_build_check_command_passes():
    result = subprocess.run([sys.executable, "docs/build.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- links and images -----------------------------------------------------------------------------------------


def test_relative_links_resolve():
    for doc in DOCS:
        headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", _text(doc)), flags=re.MULTILINE)}
        for target in _links(doc):
            if urlparse(target).scheme:
                continue
            path, _, anchor = target.partition("#")
            if not path:
                assert anchor in headings, f"{doc.name}: no heading for #{anchor}"
                continue
            assert (doc.parent / path).exists(), f"{doc.name}: {target} does not exist"


def test_notes_are_dated_linked_from_the_docs_and_their_links_resolve():
    """One-off experiments' figures live in dated notes pages (never regenerated) that a doc page links to."""
    notes = sorted((REPO / "docs" / "notes").glob("*.md"))
    assert notes
    linked = {
        (doc.parent / target.partition("#")[0]).resolve()
        for doc in DOCS
        for target in _links(doc)
        if not urlparse(target).scheme
    }
    for note in notes:
        assert re.fullmatch(r"\d{4}-\d{2}-[\w-]+\.md", note.name), note.name
        assert note.resolve() in linked, f"no doc page links to {note.name}"
        assert "not regenerated" in _text(note)
        for target in _links(note):
            if not urlparse(target).scheme:
                assert (note.parent / target.partition("#")[0]).exists(), f"{note.name}: {target} does not exist"


def test_external_links_are_well_formed_and_cite_the_sources():
    external = [t for doc in DOCS for t in _links(doc) if urlparse(t).scheme]
    for url in external:
        parts = urlparse(url)
        assert parts.scheme == "https" and "." in parts.netloc and " " not in url, url
    for required in REQUIRED_EXTERNAL:
        assert required in external, f"missing link {required}"


def test_every_image_is_made_by_a_committed_script():
    """Docs images are build.py's figures, the experiment's figure, the browser test's screenshot or trainer output."""
    made = {*build.FIGURES, "continual.png", "space.png"}
    images = [(doc, m.group("target")) for doc in DOCS for m in LINK.finditer(_text(doc)) if m.group(0)[0] == "!"]
    assert images
    for doc, target in images:
        path = (doc.parent / target).resolve()
        assert path.is_file(), f"{doc.name}: missing image {target}"
        from_docs = path.parent == sources.IMAGES and path.name in made
        from_trainer = path.parent == sources.DEMO_ADAPTER
        assert from_docs or from_trainer, f"{doc.name}: {target} is not produced by a committed script"


# --- snippets ----------------------------------------------------------------------------------------------


def _quickstart() -> list[str]:
    section = _text(REPO / "README.md").split("## Quickstart", 1)[1]
    body = FENCE.search(section).group("body")
    return [line for line in body.splitlines() if line.strip()]


def test_quickstart_test_command_is_what_ci_runs():
    commands = _quickstart()
    assert len(commands) == 2
    ci_commands = [line for line in _text(REPO / ".ci" / "run").splitlines() if line and not line.startswith("#")]
    assert commands[1] == ci_commands[-1] == "python -m pytest -q"


@pytest.mark.slow
def test_quickstart_training_command_runs_as_written(tmp_path):
    """The README's first command, verbatim, from the repository root, trains the default adapter."""
    command = _quickstart()[0]
    output = REPO / "output" / "shapes-purple"
    backup = tmp_path / "user-output"
    if output.exists():  # a user's own run: keep it safe and put it back afterwards
        shutil.move(output, backup)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
        result = subprocess.run(shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((output / "train_summary.json").read_text())
        assert (output / "pytorch_lora_weights.safetensors").stat().st_size == summary["adapter_file_bytes"] > 0
        assert summary["num_samples"] == sources.dataset_rows(REPO / "embedded" / "data" / "adapter")
        assert summary["command"] == command  # the launch line as typed, not a reconstruction
    finally:
        shutil.rmtree(output, ignore_errors=True)
        if backup.exists():
            shutil.move(backup, output)


@pytest.mark.slow
def test_python_snippets_run():
    snippets = _blocks("python")
    assert snippets
    for doc, code in snippets:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{doc.name} snippet failed:\n{code}\n{result.stderr[-2000:]}"


def _shell_commands() -> list[list[str]]:
    """Each line of the bash blocks as words, without its comment and leading `NAME=value` assignments."""
    commands = []
    for _, body in _blocks("bash"):
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def test_shell_snippets_name_real_files_and_valid_flags():
    """Every command in the docs' bash blocks parses with the real CLI and names files that exist."""
    sys.path.insert(0, str(REPO))
    from bench.__main__ import build_parser as bench_parser
    from embedded.build import build_parser as embedded_build_parser
    from eval.cli import build_parser as eval_parser
    from lorakit.config import parse_args

    commands = _shell_commands()
    assert shlex.split(sources.EVAL_COMMAND) in commands  # the README shows the command that made the figures
    assert any("train_lora.py" in c for c in commands) and any(c[:3] == ["python", "-m", "eval"] for c in commands)
    for words in commands:
        if "train_lora.py" in words:
            launch = words[: words.index("train_lora.py")]
            if "--config_file" in launch:
                assert (REPO / launch[launch.index("--config_file") + 1]).is_file()
            parse_args(words[words.index("train_lora.py") + 1 :])  # raises on an unknown flag or a bad value
        elif words[:3] == ["python", "-m", "eval"]:
            eval_parser().parse_args(words[3:])
        elif words[:3] == ["python", "-m", "bench"]:
            bench_parser().parse_args(words[3:])
        elif words[:3] == ["python", "-m", "embedded.build"]:
            embedded_build_parser().parse_args(words[3:])
        elif words[0] == "bash":
            assert (REPO / words[1]).is_file(), words
        elif words[:3] == ["python", "-m", "pytest"]:
            assert words[3:] == ["-q"]
        elif words[0] == "python":
            assert (REPO / words[1]).is_file(), words
        elif words[:2] == ["pip", "install"]:
            assert all((REPO / w).is_file() for w in words[2:] if w != "-r")
        else:
            raise AssertionError(f"unchecked command in the docs: {shlex.join(words)}")


# --- the generator's parts ---------------------------------------------------------------------------------


def test_continual_experiment_commands_parse_and_replay_old_data(tmp_path):
    sys.path.insert(0, str(REPO))
    from lorakit.config import parse_args

    experiment = _load("continual_experiment", REPO / "docs" / "continual_experiment.py")
    candidates = experiment.candidates()
    assert {c.shape for cand in candidates.values() for c in cand["concepts"]} == {"blob"}
    assert "purple" not in {c.colour for c in candidates["blob"]["concepts"]}
    assert {c.colour for c in candidates["purple_blob"]["concepts"]} == {"purple"}
    new_data = experiment.write_batch(tmp_path / "blob", candidates["purple_blob"]["concepts"], 6, 0, "test")
    assert sources.dataset_rows(new_data) == 6
    commands = {"first": experiment.first_command(tmp_path, tmp_path / "purple")}
    commands |= experiment.update_commands(tmp_path, "purple_blob", new_data, tmp_path / "purple")
    configs = {name: parse_args(command[2:]) for name, command in commands.items()}
    first = configs["first"].output.output_dir
    assert configs["first"].lora.init_adapter is None
    assert configs["naive"].lora.init_adapter == configs["replay"].lora.init_adapter
    assert Path(configs["naive"].lora.init_adapter).resolve() == Path(first).resolve()
    assert configs["naive"].data.mix_train_data_dir in (None, [])
    assert configs["replay"].data.mix_weights == [3.0, 1.0]
    assert configs["naive"].output.output_dir != configs["replay"].output.output_dir


def test_continual_bias_batch_is_skewed_and_the_rebalanced_run_samples_it_evenly(tmp_path):
    """The skewed batch holds the stated share of black images; the rebalance command parses with the trainer's
    flags and, read through lorakit's own data code, samples about as many black as white rows for as many steps."""
    sys.path.insert(0, str(REPO))
    from lorakit.config import parse_args

    experiment = _load("continual_experiment", REPO / "docs" / "continual_experiment.py")
    rows = 100
    skewed = experiment.write_skewed_batch(tmp_path / "skewed", rows)
    black, white = experiment.SKEW
    assert sources.dataset_rows(skewed["black"]) == rows * black // (black + white)
    assert sources.dataset_rows(skewed["white"]) == rows * white // (black + white)
    commands = experiment.bias_commands(tmp_path, {"old": tmp_path / "purple", "skewed": skewed}, steps=12)
    configs = {name: parse_args(command[2:]) for name, command in commands.items()}
    assert configs["skewed"].data.mix_train_data_dir in (None, [])
    assert configs["skewed_short"].training.num_train_epochs == 1  # the preset's epoch, kept for comparison
    assert configs["skewed"].training.num_train_epochs == configs["balanced"].training.num_train_epochs > 1
    fixed = configs["rebalanced"]
    assert Path(fixed.data.train_data_dir).resolve() == skewed["black"].resolve()
    assert [Path(d).resolve() for d in fixed.data.mix_train_data_dir] == [skewed["white"].resolve()]
    assert fixed.training.max_train_steps == 12 and fixed.training.num_train_epochs > 1
    assert experiment.sampled_mix(commands["skewed"])["black_share"] == black / (black + white)
    mix = experiment.sampled_mix(commands["rebalanced"])
    assert abs(mix["black_share"] - 0.5) < 0.15
    batch = 8  # the preset's batch: the rebalanced epochs cover the step cap
    assert mix["rows"] * fixed.training.num_train_epochs >= 12 * batch


def test_continual_experiment_judges_enough_images_and_reads_backgrounds():
    experiment = _load("continual_experiment", REPO / "docs" / "continual_experiment.py")
    for prompts in (["a"] * 2, ["a"] * 10, ["a"] * 14):
        seeds = experiment.seeds_for(prompts)
        assert len(seeds) >= experiment.MIN_SEEDS and len(seeds) * len(prompts) >= experiment.MIN_IMAGES
    neutral = experiment.set_seeds("purple_neutral", ["a"] * 5)
    assert len(neutral) * 5 >= experiment.NEUTRAL_IMAGES > experiment.MIN_IMAGES
    sys.path.insert(0, str(REPO))
    from embedded import world
    from embedded.measure import to_uint8

    concepts = [world.Concept("star", "purple", bg) for bg in ("black", "white", "black")]
    images = to_uint8([image for image, _, _ in world.sample(concepts, 3, 0)])
    assert experiment.is_black(images).tolist() == [True, False, True]
    for prompt in [p for prompts in experiment.neutral_prompts().values() for p in prompts]:
        assert world.parse_caption(prompt).background is None, prompt


def test_wilson_interval_matches_hand_computed_values():
    from docgen.stats import intervals_apart, wilson_interval

    # 45 of 50: centre (0.9 + 1.96^2/100) / (1 + 1.96^2/50), half-width 1.96 sqrt(0.0018 + 1.96^2/10^4) / (same)
    assert wilson_interval(45, 50) == pytest.approx((0.7864, 0.9565), abs=1e-4)
    assert wilson_interval(0, 50) == pytest.approx((0.0, 0.0713), abs=1e-4)  # 1.96^2/50 / (1 + 1.96^2/50)
    assert wilson_interval(50, 50) == pytest.approx((0.9287, 1.0), abs=1e-4)
    assert wilson_interval(1, 10) == pytest.approx((0.0179, 0.4042), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert intervals_apart((0.1, 0.2), (0.3, 0.4)) and not intervals_apart((0.1, 0.35), (0.3, 0.4))


def test_figures_from_a_tiny_pipeline(tiny_pipeline_dir):
    from docgen import figures

    pipe = figures.load_pipeline(tiny_pipeline_dir)
    frames = figures.denoising_frames(pipe, "a red circle", seed=0, steps=4, guidance=7.5, show=(0, 2, 4))
    assert [step for step, _ in frames] == [0, 2, 4]
    first, last = (np.asarray(image) for _, image in (frames[0], frames[-1]))
    assert not np.array_equal(first, last)  # the sampler changed the picture
    strip = figures.denoising_strip(frames, 4, "a red circle")
    assert strip.width > 3 * figures.CELL and strip.height > figures.CELL
    grid = figures.sample_grid([frames[0][1]] * 2, [frames[-1][1]] * 2, ["a red circle"], (0, 1))
    assert grid.width > 4 * figures.CELL
    diagram = figures.parts_diagram("a red circle", frames[0][1], frames[-1][1], 4)
    assert (
        diagram.getpixel((10, 10)) == figures.PAPER
        and len(np.unique(np.asarray(diagram.convert("RGB")).reshape(-1, 3), axis=0)) > 50
    )


def test_bk_sdm_tiny_counts_in_the_docs_are_the_real_architecture():
    """The committed counts equal those published with the eval issue for nota-ai/bk-sdm-tiny."""
    counts = json.loads(sources.SIZES_BK_SDM.read_text())
    assert counts["parameters"]["unet"] == 323_384_964
    assert counts["parameters"]["text_encoder"] == 123_060_480
    assert counts["parameters"]["vae"] == 83_653_863
    assert counts["lora_by_rank"]["4"] == 431_616


def test_a_win_of_one_image_is_not_beyond_noise():
    from docgen.render import beats_beyond_noise

    assert not beats_beyond_noise(0.92, 0.90, 50)  # one image of 50
    assert beats_beyond_noise(0.90, 0.60, 50)
    assert not beats_beyond_noise(0.60, 0.90, 50)  # behind is never a win


def test_the_options_table_says_whether_bf16_kept_the_quality_of_fp32():
    from docgen.render import options_table, within_noise

    assert within_noise(0.88, 0.90, 50) and within_noise(0.90, 0.88, 50)
    assert not within_noise(0.60, 0.90, 50) and not within_noise(0.90, 0.60, 50)

    def variant(name, label, precision, purple, base):
        sets = {
            "adapter": {"num_images": 50, "adapter": {"r_precision_top1": purple}, "base": {"r_precision_top1": 0.0}},
            "base": {"num_images": 210, "adapter": {"r_precision_top1": base}, "base": {"r_precision_top1": 0.86}},
        }
        return {
            "name": name,
            "label": label,
            "mixed_precision": precision,
            "eval": {"sets": sets},
            "held_out_loss": 0.07,
            "train_seconds": 10.0,
            "peak_memory_bytes": 7e8,
            "global_step": 60,
            "memory_kind": "peak resident memory",
        }

    results = {
        "preset": "configs/shapes.yaml",
        "held_out": {"rows": 48},
        "seeds": [0, 1, 2, 3, 4],
        "device": "cpu",
        "command": "python docs/options_experiment.py",
        "variants": [
            variant("adamw", "AdamW", "no", 0.90, 0.89),
            variant("bf16", "bf16 mixed precision", "bf16", 0.88, 0.89),
        ],
    }
    text = options_table(results)
    assert (
        "| AdamW | 0.90 | 0.89 | 0.0700 | fp32 |" in text
        and "| bf16 mixed precision | 0.88 | 0.89 | 0.0700 | bf16 |" in text
    )
    assert (
        "bf16 mixed precision against the fp32 preset row: purple 0.88 against 0.90, base 0.89 against 0.89, "
        "within the noise" in text
    )
    results["variants"][1] = variant("bf16", "bf16 mixed precision", "bf16", 0.50, 0.89)
    assert "a difference beyond the noise" in options_table(results)
