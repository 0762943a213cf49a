"""CLIP metrics for generated images: CLIP score (torchmetrics) and CLIP R-precision.

CLIP score (Hessel et al., 2021, arXiv 2104.08718) is 100 * cosine(image, text), clamped at 0. CLIP
R-precision (Park et al., 2021, "Benchmark for compositional text-to-image synthesis") ranks each image's
own prompt among candidate prompts by CLIP similarity: it tells apart concepts a score average blurs.
Functions here take a loaded `(model, processor)` pair; loading from disk or the Hub is the caller's I/O.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torchmetrics.functional.multimodal import clip_score as _torchmetrics_clip_score


class ClipFeatures(torch.nn.Module):
    """A CLIPModel whose `get_*_features` return tensors, as torchmetrics expects.

    transformers 5 returns `BaseModelOutputWithPooling` from `get_text_features`/`get_image_features`
    (the projected embedding is its `pooler_output`); torchmetrics 1.9 calls `.norm()` on the result.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output: object) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_text_features(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Projected text embeddings."""
        return self._tensor(self.model.get_text_features(*args, **kwargs))

    def get_image_features(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Projected image embeddings."""
        return self._tensor(self.model.get_image_features(*args, **kwargs))


def clip_context_length(model: torch.nn.Module, processor: object) -> int:
    """Token context of the CLIP text tower (77 for OpenAI CLIP)."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    if text_config is not None and getattr(text_config, "max_position_embeddings", None):
        return int(text_config.max_position_embeddings)
    return int(processor.tokenizer.model_max_length)


def truncate_prompts(prompts: Sequence[str], tokenizer: object, max_tokens: int) -> tuple[list[str], list[int]]:
    """Cut prompts to fit `max_tokens` (start/end tokens included); returns (prompts, indices truncated)."""
    result, truncated = [], []
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) + 2 <= max_tokens:
            result.append(prompt)
            continue
        # Re-decode the kept tokens so the text the metric sees is exactly what fits, end token included.
        result.append(tokenizer.decode(ids[: max_tokens - 2]).strip())
        truncated.append(index)
    return result, truncated


def fit_prompts_to_clip(prompts: Sequence[str], model: torch.nn.Module, processor: object) -> list[str]:
    """Prompts truncated to the CLIP context, with a warning naming how many were cut."""
    fitted, truncated = truncate_prompts(prompts, processor.tokenizer, clip_context_length(model, processor))
    if truncated:
        warnings.warn(
            f"{len(truncated)} prompt(s) exceed the CLIP context of {clip_context_length(model, processor)} tokens "
            f"and were truncated for scoring (first: prompt #{truncated[0]}).",
            UserWarning,
            stacklevel=2,
        )
    return fitted


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 in 0-255 from float images in [0, 1] or uint8 input (the CLIP processor rescales)."""
    if images.dtype == torch.uint8:
        return images
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def clip_score(images: torch.Tensor, prompts: Sequence[str], model: torch.nn.Module, processor: object) -> float:
    """Mean CLIP score of image i with prompt i, via torchmetrics with the `(model, processor)` callable form."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score needs one prompt per image; got {len(images)} images, {len(prompts)} prompts.")
    wrapped = model if isinstance(model, ClipFeatures) else ClipFeatures(model)
    fitted = fit_prompts_to_clip(prompts, wrapped.model, processor)
    # torchmetrics moves the model to the images' device; send the images to the model instead.
    device = next(wrapped.parameters()).device
    with torch.no_grad():
        score = _torchmetrics_clip_score(to_uint8_images(images).to(device), fitted, lambda: (wrapped, processor))
    return float(score)


@torch.no_grad()
def clip_embeddings(
    images: torch.Tensor | None, texts: Sequence[str] | None, model: torch.nn.Module, processor: object
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2-normalised CLIP embeddings of images (uint8 or [0, 1] tensors) and texts; either may be None."""
    wrapped = model if isinstance(model, ClipFeatures) else ClipFeatures(model)
    device = next(wrapped.parameters()).device
    image_emb = text_emb = None
    if images is not None:
        pixels = processor(images=list(to_uint8_images(images).cpu()), return_tensors="pt")["pixel_values"]
        image_emb = torch.nn.functional.normalize(wrapped.get_image_features(pixels.to(device)).float(), dim=-1)
    if texts is not None:
        fitted = fit_prompts_to_clip(texts, wrapped.model, processor)
        tokens = processor.tokenizer(fitted, return_tensors="pt", padding=True)
        text_emb = wrapped.get_text_features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    return image_emb, text_emb


@dataclass(frozen=True)
class RPrecision:
    """Top-1 accuracy and mean rank (1 = best) of each image's own prompt among the candidates."""

    top1: float
    mean_rank: float
    ranks: tuple[int, ...]
    num_candidates: int
    best: tuple[int, ...] = ()  # the candidate each image scored highest with
    best_texts: tuple[str, ...] = ()  # that candidate's text (filled in by clip_r_precision)


def r_precision(similarity: torch.Tensor, targets: Sequence[int]) -> RPrecision:
    """R-precision from an (images x candidates) similarity matrix and each image's own candidate index.

    Ties count against the image (rank = candidates scoring at least as high as its own), so a CLIP that
    scores everything alike gets the worst rank rather than a perfect one.
    """
    if similarity.ndim != 2 or similarity.shape[0] != len(targets):
        raise ValueError(f"similarity must be (images, candidates) with one target per image; got {similarity.shape}")
    target_index = torch.as_tensor(list(targets), dtype=torch.long)
    if len(target_index) and (target_index.min() < 0 or target_index.max() >= similarity.shape[1]):
        raise ValueError("every target must index a candidate")
    relevant = torch.zeros(similarity.shape, dtype=torch.bool)
    relevant[torch.arange(len(target_index)), target_index] = True
    return r_precision_relevant(similarity, relevant)


def r_precision_relevant(similarity: torch.Tensor, relevant: torch.Tensor) -> RPrecision:
    """R-precision where several candidates may be right for an image (`relevant`, images x candidates, bool).

    A prompt that leaves something open ("a red circle", no background named) is matched by every candidate
    that fits it; the image's rank is that of its best-scoring relevant candidate, ties counting against it.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} differ")
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every image needs at least one relevant candidate")
    own = similarity.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    ranks = (similarity >= own).sum(dim=1)
    return RPrecision(
        top1=float((ranks == 1).float().mean()),
        mean_rank=float(ranks.float().mean()),
        ranks=tuple(int(rank) for rank in ranks),
        num_candidates=int(similarity.shape[1]),
        best=tuple(int(index) for index in similarity.argmax(dim=1)),
    )


def top1_by_seed(ranks: Sequence[int], seeds: Sequence[int]) -> dict[int, float]:
    """Top-1 rate among the images of each seed, in the order the seeds first appear.

    An evaluation that starts every prompt of a seed from the same noise draws its images in correlated groups:
    one unlucky starting noise can fail many prompts at once. The spread across seeds shows how far a figure
    from a few seeds can move, which a single pooled rate hides.
    """
    if len(ranks) != len(seeds):
        raise ValueError(f"{len(ranks)} ranks but {len(seeds)} seeds: one seed per image")
    hits: dict[int, list[bool]] = {}
    for rank, seed in zip(ranks, seeds, strict=True):
        hits.setdefault(int(seed), []).append(rank == 1)
    return {seed: sum(found) / len(found) for seed, found in hits.items()}


def clip_r_precision(
    images: torch.Tensor,
    prompts: Sequence[str],
    candidates: Sequence[str],
    model: torch.nn.Module,
    processor: object,
    same_meaning: Callable[[str, str], bool] | None = None,
) -> RPrecision:
    """CLIP R-precision of images against `candidates`.

    Without `same_meaning`, an image's only right answer is its own prompt, added to the candidates if missing.
    With it, every candidate for which `same_meaning(prompt, candidate)` holds is right, so a prompt phrased
    freely is judged by what it says; a prompt no candidate means is added as its own (only) right answer.
    """
    if same_meaning is None:
        pool = list(dict.fromkeys([*candidates, *prompts]))  # dedupe, keep order: a repeated prompt is one candidate
        matches = [[text == prompt for text in pool] for prompt in prompts]
    else:
        unmatched = [p for p in prompts if not any(same_meaning(p, c) for c in candidates)]
        pool = list(dict.fromkeys([*candidates, *unmatched]))
        matches = [[text == prompt or same_meaning(prompt, text) for text in pool] for prompt in prompts]
    image_emb, text_emb = clip_embeddings(images, pool, model, processor)
    result = r_precision_relevant(image_emb @ text_emb.T, torch.tensor(matches, dtype=torch.bool))
    return replace(result, best_texts=tuple(pool[index] for index in result.best))
