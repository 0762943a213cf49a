"""Own data (issue 18): folders of images with caption files, repeat folders, caption flags, buckets.

Scans, captions and batch orders are checked directly; bad input through `train_lora.main`, which must exit 2
before any model loads. The training runs are in test_user_data_train.py (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import make_tiny_imagefolder, tiny_train_args
from user_data import BUCKET_FLAGS, SQUARE, TALL, WIDE, make_repeat_tree, save_image

import train_lora
from lorakit.buckets import BucketBatchSampler, BucketSpec, assign_buckets, histogram, make_buckets, nearest_bucket
from lorakit.captions import CaptionOptions, apply_options, count_truncated, shuffle_parts, trigger_word, with_trigger
from lorakit.config import DataConfig, parse_args
from lorakit.data import CaptionedImageDataset, load_source, prepare_dataset, resize_and_crop_to
from lorakit.latent_cache import CachedLatentDataset
from lorakit.sidecar import is_sidecar_folder, scan_folder
from lorakit.tokenizer import build_clip_tokenizer


def data_config(folder: Path, *extra: str) -> DataConfig:
    return parse_args(tiny_train_args(Path("unused"), folder, Path("unused-out"), *extra)).data


# --- the folder scan ---------------------------------------------------------------------------------------------


def test_repeat_tree_gives_images_times_repeats_and_folder_captions(tmp_path):
    root = make_repeat_tree(tmp_path / "data")
    (root / "1_background" / "gone.txt").write_text("a caption whose image was deleted")
    data = prepare_dataset(data_config(root), seed=0)
    assert data.source == {
        "format": "sidecar captions",
        "images": 6,
        "rows": 3 * 3 + 3,
        "folder_captions": 1,
        "skipped_files": 1,
        "orphan_captions": 1,
    }
    captions = data.rows["text"]
    assert len(captions) == 12
    assert captions.count("red circle") == 3  # the folder's words caption the image with no .txt, 3 times
    assert captions.count("a red square, on a white background") == 3  # the trailing newline stripped
    assert captions.count("a green circle") == 1  # nested folders repeat as their repeat folder (here: once)


def test_caption_extension_selects_the_caption_files(tmp_path):
    root = tmp_path / "data"
    save_image(root / "a.png", SQUARE, 0)
    (root / "a.caption").write_text("a red circle")
    (root / "a.txt").write_text("not this one")
    scan = scan_folder(root, ".caption")
    assert scan.captions == ["a red circle"] and scan.skipped_files == 1
    assert data_config(root, "--caption_extension", "caption").caption_extension == ".caption"


def test_detection_order_of_the_formats(tmp_path):
    """save_to_disk, then data files (metadata.jsonl/csv, parquet), then caption files, then imagefolder."""
    with_metadata = make_tiny_imagefolder(tmp_path / "imagefolder", rows=2)
    (with_metadata / "000.txt").write_text("a caption file the metadata wins over")
    assert not is_sidecar_folder(with_metadata, ".txt")
    rows, source = load_source(data_config(with_metadata))
    assert source is None and rows["text"][0] == "a red circle on a white background"

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a row"]}).save_to_disk(str(saved))
    (saved / "x.txt").write_text("ignored")
    assert load_source(data_config(saved))[1] is None

    sidecar = tmp_path / "sidecar"
    save_image(sidecar / "a.png", SQUARE, 0)
    (sidecar / "a.txt").write_text("a red circle")
    assert is_sidecar_folder(sidecar, ".txt")
    assert load_source(data_config(sidecar))[1]["format"] == "sidecar captions"

    only_images = tmp_path / "only_images"
    save_image(only_images / "a.png", SQUARE, 0)
    assert not is_sidecar_folder(only_images, ".txt")  # datasets' imagefolder, which reports the missing captions


# --- bad input: one message, exit 2, before any model loads ---------------------------------------------------------


@pytest.fixture
def refuse_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(train_lora, "load_models", refuse)


def run_main(capsys, pipeline: Path, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = train_lora.main(tiny_train_args(pipeline, data, out, *extra))
    return code, capsys.readouterr().err


@pytest.mark.usefixtures("refuse_models")
def test_uncaptioned_images_outside_repeat_folders_are_counted_and_five_named(capsys, tiny_pipeline_dir, tmp_path):
    root = tmp_path / "data"
    save_image(root / "captioned.png", SQUARE, 0)
    (root / "captioned.txt").write_text("a red circle")
    for index in range(7):
        save_image(root / "plain" / f"bare{index}.png", SQUARE, index)
    code, err = run_main(capsys, tiny_pipeline_dir, root, tmp_path / "out")
    assert code == 2 and "7 image(s)" in err and "no .txt caption file" in err
    assert "plain/bare0.png" in err and "plain/bare4.png" in err and "plain/bare5.png" not in err
    assert "... and 2 more" in err and "N_words" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("refuse_models")
def test_empty_caption_file(capsys, tiny_pipeline_dir, tmp_path):
    root = make_repeat_tree(tmp_path / "data")
    (root / "1_background" / "wide.txt").write_text("  \n")
    code, err = run_main(capsys, tiny_pipeline_dir, root, tmp_path / "out")
    assert code == 2 and "1 caption file(s)" in err and "are empty" in err and "1_background/wide.txt" in err


@pytest.mark.usefixtures("refuse_models")
@pytest.mark.parametrize("folder", ["0_empty", "-2_negative"])
def test_repeat_folder_with_fewer_than_one_repeat(capsys, tiny_pipeline_dir, tmp_path, folder):
    root = make_repeat_tree(tmp_path / "data")
    save_image(root / folder / "a.png", SQUARE, 9)
    code, err = run_main(capsys, tiny_pipeline_dir, root, tmp_path / "out")
    assert code == 2 and "fewer than 1 repeat" in err and folder in err and "rename it" in err


@pytest.mark.usefixtures("refuse_models")
def test_truncated_image_in_a_caption_folder(capsys, tiny_pipeline_dir, tmp_path):
    root = make_repeat_tree(tmp_path / "data")
    broken = root / "1_background" / "nested" / "tall.png"
    broken.write_bytes(broken.read_bytes()[:60])
    code, err = run_main(capsys, tiny_pipeline_dir, root, tmp_path / "out")
    assert code == 2 and "cannot be read" in err and "tall.png" in err and "Remove or replace it" in err


@pytest.mark.usefixtures("refuse_models")
def test_folder_with_captions_but_no_images(capsys, tiny_pipeline_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.txt").write_text("a red circle")
    (root / "b.md").write_text("notes")
    code, err = run_main(capsys, tiny_pipeline_dir, root, tmp_path / "out")
    assert code == 2 and "holds no images" in err and "1 other file(s)" in err


@pytest.mark.usefixtures("refuse_models")
def test_bucket_step_must_be_a_multiple_of_the_vae_factor(capsys, tiny_pipeline_dir, tmp_path):
    root = make_repeat_tree(tmp_path / "data")
    flags = ["--resolution", "40", "--enable_bucket", "--bucket_reso_steps", "10"]
    flags += ["--min_bucket_reso", "20", "--max_bucket_reso", "80"]
    code, err = run_main(capsys, tiny_pipeline_dir, root, tmp_path / "out", *flags)
    assert code == 2 and "--bucket_reso_steps 10 is not a multiple of the VAE factor 4: use 8 or 12" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min_bucket_reso", "40"], "--min_bucket_reso 40 is not a positive multiple of --bucket_reso_steps 16"),
        (["--max_bucket_reso", "32"], "--resolution 48 lies outside the bucket sides [16, 32]"),
        (["--caption_dropout_rate", "1"], "--caption_dropout_rate 1.0 is invalid"),
        (["--keep_tokens", "1"], "--keep_tokens only applies with --shuffle_caption"),
    ],
)
def test_bad_bucket_and_caption_flags(capsys, tmp_path, flags, message):
    code = train_lora.main(tiny_train_args(Path("unused"), tmp_path, tmp_path / "out", *BUCKET_FLAGS, *flags))
    assert code == 2 and message in capsys.readouterr().err


# --- captions ----------------------------------------------------------------------------------------------------


def test_prefix_goes_before_every_caption_and_is_the_trigger_word():
    options = CaptionOptions(prefix="nrt style, ")
    assert apply_options("a man", options, seed=0, epoch=0, index=3) == "nrt style, a man"
    assert trigger_word("nrt style, ") == "nrt style"
    assert with_trigger("a girl", "nrt style, ") == "nrt style, a girl"
    assert with_trigger("a girl, nrt style", "nrt style, ") == "a girl, nrt style"  # not twice


def test_dropout_rate_within_tolerance_and_deterministic():
    options = CaptionOptions(prefix="p, ", dropout_rate=0.1)
    draws = [apply_options("a red circle", options, seed=1, epoch=0, index=i) for i in range(10_000)]
    dropped = draws.count("")
    # Binomial(10000, 0.1): standard deviation 30, so +-150 is five of them.
    assert abs(dropped - 1_000) < 150
    assert set(draws) == {"", "p, a red circle"}  # the prefix is dropped with the caption (an unconditional sample)
    again = [apply_options("a red circle", options, seed=1, epoch=0, index=i) for i in range(10_000)]
    next_epoch = [apply_options("a red circle", options, seed=1, epoch=1, index=i) for i in range(10_000)]
    assert draws == again and draws != next_epoch


def test_shuffle_keeps_the_first_parts_and_depends_on_seed_epoch_index_only():
    caption = "nrt, a man, blue eyes, spiky hair, red coat, smiling"
    options = CaptionOptions(shuffle=True, keep_tokens=2)
    seen = set()
    for epoch in range(20):
        shuffled = apply_options(caption, options, seed=0, epoch=epoch, index=5)
        parts = shuffled.split(", ")
        assert parts[:2] == ["nrt", "a man"] and sorted(parts) == sorted(caption.split(", "))
        assert shuffled == apply_options(caption, options, seed=0, epoch=epoch, index=5)
        seen.add(shuffled)
    assert len(seen) > 5  # the order really changes between epochs
    assert apply_options(caption, options, 0, 0, 5) != apply_options(caption, options, 0, 0, 6)


def test_shuffle_with_another_separator():
    import random

    shuffled = shuffle_parts("a | b | c | d", " | ", 1, random.Random(3))
    assert shuffled.startswith("a | ") and sorted(shuffled.split(" | ")) == ["a", "b", "c", "d"]


def test_caption_flags_do_not_change_the_image_draws(tmp_path):
    """Caption randomness has its own generator: the crop a sample gets is the same with or without the flags."""
    root = make_repeat_tree(tmp_path / "data")
    data = prepare_dataset(data_config(root), seed=0)
    tokenizer = build_clip_tokenizer(["a", "red"])
    plain = CaptionedImageDataset(data.rows, "image", "text", tokenizer, 32, seed=4)
    flagged = CaptionedImageDataset(
        data.rows, "image", "text", tokenizer, 32, seed=4, captions=CaptionOptions("x, ", 0.5, True)
    )
    for index in range(len(plain)):
        assert torch.equal(plain[index]["pixel_values"], flagged[index]["pixel_values"])


def test_truncated_captions_are_counted_with_one_example():
    tokenizer = build_clip_tokenizer(["a", "red", "circle"])
    long = " ".join(["red circle"] * 60)
    count, example = count_truncated(["a red circle", long, long, "a circle"], tokenizer, prefix="a, ")
    assert count == 2 and example == "a, " + long
    assert count_truncated(["a red circle"], tokenizer) == (0, None)


def test_cached_text_dropout_swaps_in_the_empty_caption_per_seed_epoch_index():
    tensors = {
        "latent_moments": torch.zeros(400, 8, 2, 2),
        "encoder_hidden_states": torch.ones(400, 3, 4),
        "empty_encoder_hidden_states": torch.full((1, 3, 4), -1.0),
    }
    cached = CachedLatentDataset(tensors, dropout_rate=0.25, seed=7)
    first = [bool((cached[i]["encoder_hidden_states"] == -1).all()) for i in range(400)]
    assert 60 < sum(first) < 140
    expected = [apply_options("c", CaptionOptions(dropout_rate=0.25), 7, 0, i) == "" for i in range(400)]
    assert first == expected  # the same draws as an uncached run
    cached.set_epoch(1)
    assert [bool((cached[i]["encoder_hidden_states"] == -1).all()) for i in range(400)] != first


# --- buckets -----------------------------------------------------------------------------------------------------


def test_buckets_are_step_multiples_within_the_area_and_sides():
    spec = BucketSpec(resolution=512, min_reso=256, max_reso=1024, step=64)
    buckets = make_buckets(spec)
    assert (512, 512) in buckets and (768, 320) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0 and 256 <= min(width, height) and max(width, height) <= 1024
        assert width * height <= 512 * 512
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    # 2:1 has no exact bucket here: 704x320 (2.2) is nearer than 640x384 (1.67) on the log scale.
    assert nearest_bucket((2000, 1000), buckets) == (704, 320)
    assert nearest_bucket((1000, 2000), buckets) == (320, 704)


def test_tiny_buckets_give_exact_2_to_1_and_1_to_2():
    spec = BucketSpec(resolution=48, min_reso=16, max_reso=64, step=16)
    assert assign_buckets([WIDE, TALL, SQUARE], spec) == [(64, 32), (32, 64), (48, 48)]
    assert histogram([(64, 32), (48, 48), (64, 32)]) == {"64x32": 2, "48x48": 1}


def test_no_upscale_never_enlarges():
    spec = BucketSpec(resolution=512, min_reso=256, max_reso=1024, step=64, no_upscale=True)
    for size in [(300, 200), (900, 300), (1000, 1000), (130, 700)]:
        width, height = assign_buckets([size], spec)[0]
        assert width <= max(size[0], 64) and height <= max(size[1], 64) and width * height <= 512 * 512
        assert width % 64 == 0 and height % 64 == 0
    assert assign_buckets([(300, 200)], spec) == [(256, 192)]


def test_resize_to_a_bucket_covers_it_and_crops_the_least():
    from PIL import Image

    image = Image.new("RGB", (100, 50))
    import random

    cropped = resize_and_crop_to(image, (64, 32), center_crop=True, rng=random.Random(0))
    assert cropped.size == (64, 32)
    cropped = resize_and_crop_to(Image.new("RGB", (100, 40)), (64, 32), center_crop=False, rng=random.Random(0))
    assert cropped.size == (64, 32)  # 100x40 -> 80x32, 16 columns cropped, no rows


def sampler_for(sizes: list[tuple[int, int]], batch: int, seed: int = 0, processes: int = 1) -> BucketBatchSampler:
    return BucketBatchSampler(sizes, batch, seed, processes)


def test_bucket_batches_never_mix_sizes_and_cover_each_sample_once():
    sizes = [(64, 32)] * 7 + [(32, 64)] * 5 + [(48, 48)] * 4
    sampler = sampler_for(sizes, 3)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert all(len({sizes[i] for i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(16))
        assert len(batches) == len(sampler) == 3 + 2 + 2
    assert sampler.batches(0) == sampler_for(sizes, 3).batches(0)  # (seed, epoch) alone
    assert sampler.batches(0) != sampler.batches(1)
    assert sampler.batches(0) != sampler_for(sizes, 3, seed=1).batches(0)


def test_two_processes_each_get_their_own_bucket_batches():
    """Through accelerate's own sharding, as `accelerator.prepare` does it."""
    sizes = [(64, 32)] * 4 + [(32, 64)] * 4 + [(48, 48)] * 4
    sampler = sampler_for(sizes, 2, processes=2)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=p)) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(12))
    assert all(len({sizes[i] for i in batch}) == 1 for shard in shards for batch in shard)


def test_an_odd_batch_count_is_filled_for_every_process():
    sizes = [(64, 32)] * 2 + [(48, 48)] * 2 + [(32, 64)] * 1
    sampler = sampler_for(sizes, 2, processes=2)
    assert len(sampler) == 4 and len(sampler.batches(0)) == 4
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=p)) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2
    assert set(i for shard in shards for batch in shard for i in batch) == set(range(5))


def test_bucketed_dataset_yields_each_sample_at_its_bucket(tmp_path):
    root = make_repeat_tree(tmp_path / "data")
    data = prepare_dataset(data_config(root, *BUCKET_FLAGS), seed=0)
    assert data.bucket_histogram == {"32x64": 4, "48x48": 4, "64x32": 4}
    dataset = CaptionedImageDataset(
        data.rows, "image", "text", build_clip_tokenizer(["a"]), 48, sizes=data.buckets, seed=0
    )
    for index, (width, height) in enumerate(data.buckets):
        assert dataset[index]["pixel_values"].shape == (3, height, width)
    assert json.dumps(data.bucket_histogram)  # what the summary stores


def test_a_folder_on_the_command_line_replaces_the_presets_hub_dataset():
    cfg = parse_args(["--config", "configs/bk-sdm-tiny-naruto.yaml", "--train_data_dir", "my-data"])
    assert cfg.data.train_data_dir == "my-data" and cfg.data.dataset_name is None


def test_the_start_reports_the_scan_the_orphans_and_the_buckets(tmp_path, capsys, caplog):
    from types import SimpleNamespace

    root = make_repeat_tree(tmp_path / "data")
    (root / "1_background" / "gone.txt").write_text("its image was deleted")
    (root / "1_background" / "also-gone.txt").write_text("and this one's")
    data = prepare_dataset(data_config(root, *BUCKET_FLAGS), seed=0)
    train_lora.report_data(SimpleNamespace(print=print), data)
    out = capsys.readouterr().out
    assert "Read 6 images with caption files (12 samples per epoch with repeats)" in out
    assert "1 captioned by their repeat folder's name, 1 non-image file(s) skipped" in out
    assert "Buckets (width x height: samples): 32x64: 4, 48x48: 4, 64x32: 4." in out
    assert "2 caption file(s) have no image beside them" in caplog.text


def test_validation_images_at_the_training_resolution_unless_sized():
    from types import SimpleNamespace

    from lorakit.config import ValidationArgs
    from lorakit.validation import render_validation_images

    sizes = []

    def pipe(prompt, height, width, **kwargs):
        sizes.append((width, height))
        return SimpleNamespace(images=[None])

    pipe.unet = SimpleNamespace(dtype=torch.float32)
    square = ValidationArgs(validation_prompt=["a"], num_validation_images=1)
    sized = ValidationArgs(validation_prompt=["a"], num_validation_images=1, validation_width=64, validation_height=32)
    for validation in (square, sized):
        render_validation_images(pipe, validation, 48, torch.device("cpu"))
    assert sizes == [(48, 48), (64, 32)]


def test_a_held_out_split_of_repeat_folders_is_refused(tmp_path):
    from lorakit.data import DataError

    root = make_repeat_tree(tmp_path / "data")
    with pytest.raises(DataError, match="repeat folders .*6 images in 12 rows.*--validation_data_dir"):
        prepare_dataset(DataConfig(train_data_dir=str(root), resolution=32, validation_split=0.2), 0)


def test_sideways_phone_photos_are_bucketed_and_trained_upright(tmp_path):
    """A JPEG stored 80x40 with EXIF orientation 6 (camera held upright) is a 40x80 portrait to every viewer."""
    from PIL import Image

    from lorakit.data import EXIF_ORIENTATION_TAG

    stored = Image.new("RGB", (80, 40), (220, 30, 30))
    stored.paste((30, 60, 220), (40, 0, 80, 40))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6  # viewers turn it a quarter clockwise: the stored left half ends up on top
    folder = tmp_path / "data"
    folder.mkdir()
    stored.save(folder / "portrait.jpg", exif=exif, quality=95)
    (folder / "portrait.txt").write_text("a red circle")
    save_image(folder / "square.png", SQUARE, 0)
    (folder / "square.txt").write_text("a red square")
    data = prepare_dataset(data_config(folder, *BUCKET_FLAGS), seed=0)
    assert data.bucket_histogram == {"32x64": 1, "48x48": 1}  # the photo went to the portrait bucket
    portrait = data.buckets.index((32, 64))
    dataset = CaptionedImageDataset(
        data.rows, "image", "text", build_clip_tokenizer(["a"]), 48, sizes=data.buckets, seed=0
    )
    pixels = dataset[portrait]["pixel_values"]  # (3, 64, 32) in [-1, 1]
    top, bottom = pixels[:, :24].mean(dim=(1, 2)), pixels[:, 40:].mean(dim=(1, 2))
    assert top[0] > 0.5 and top[2] < -0.3  # red on top
    assert bottom[2] > 0.3 and bottom[0] < -0.3  # blue below
