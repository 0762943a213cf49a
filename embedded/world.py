"""The shapes world: a seeded generator of anti-aliased captioned shape images.

Base concepts pretrain the UNet (minus a few held-out shape/colour combinations); the adapter concept
(a new colour, ``purple``) is never shown to the UNet and is what the default LoRA teaches. ``blob``
shapes are near-miss distractors that only the CLIP judge sees, so a wobbly blob never passes for a shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 8  # draw at 256 px, downscale with LANCZOS: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "cross")
BASE_COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 30),
    "green": (35, 165, 65),
    "blue": (35, 85, 215),
}
ADAPTER_COLOURS = {"purple": (140, 40, 190)}
COLOURS = {**BASE_COLOURS, **ADAPTER_COLOURS}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}
DISTRACTOR_SHAPE = "blob"
HELDOUT_COMBOS = (("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "square"))

CANONICAL_TEMPLATE = "a {colour} {shape} on a {background} background"
TEMPLATES = (CANONICAL_TEMPLATE, "a {colour} {shape} on {background}", "{colour} {shape}, {background} background")


@dataclass(frozen=True)
class Concept:
    """One captionable combination of shape, colour and background."""

    shape: str
    colour: str
    background: str

    def caption(self, template: str = CANONICAL_TEMPLATE) -> str:
        """The caption of this concept under `template`."""
        return template.format(colour=self.colour, shape=self.shape, background=self.background)


def _concepts(shapes: tuple[str, ...], colours: list[str]) -> list[Concept]:
    return [Concept(s, c, b) for c in colours for s in shapes for b in BACKGROUNDS]


def base_concepts() -> list[Concept]:
    """Concepts the UNet is pretrained on (held-out combinations removed)."""
    return [c for c in _concepts(SHAPES, list(BASE_COLOURS)) if (c.colour, c.shape) not in HELDOUT_COMBOS]


def heldout_concepts() -> list[Concept]:
    """Known words in combinations the UNet never saw."""
    return [c for c in _concepts(SHAPES, list(BASE_COLOURS)) if (c.colour, c.shape) in HELDOUT_COMBOS]


def adapter_concepts() -> list[Concept]:
    """The adapter concept: every shape in the new colour."""
    return _concepts(SHAPES, list(ADAPTER_COLOURS))


def distractor_concepts() -> list[Concept]:
    """Near-miss blobs in every colour, only for the judge's hard negatives."""
    return _concepts((DISTRACTOR_SHAPE,), list(COLOURS))


def all_concepts() -> list[Concept]:
    """Every concept the judge knows: the candidate captions for R-precision."""
    return base_concepts() + heldout_concepts() + adapter_concepts() + distractor_concepts()


def world_words() -> list[str]:
    """Every word of every caption template, so each becomes one token."""
    words = set()
    for concept in all_concepts():
        for template in TEMPLATES:
            words.update(concept.caption(template).replace(",", " , ").split())
    return sorted(words)


def _polygon(shape: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Outline points of `shape` centred at (cx, cy) with outer radius r."""
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
        return [
            (cx + r * (1 if i % 2 == 0 else 0.42) * math.cos(a), cy + r * (1 if i % 2 == 0 else 0.42) * math.sin(a))
            for i, a in enumerate(angles)
        ]
    if shape == "cross":
        w, L = r * 0.33, r
        pts = [
            (-w, -L),
            (w, -L),
            (w, -w),
            (L, -w),
            (L, w),
            (w, w),
            (w, L),
            (-w, L),
            (-w, w),
            (-L, w),
            (-L, -w),
            (-w, -w),
        ]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "blob":
        # a lumpy potato: two low-frequency radius wobbles, strong enough that its outline is never a circle
        # (a near-miss the judge must not confuse with a circle, nor, having no corners, with a pointed shape)
        k, amp, phase = int(rng.integers(2, 4)), float(rng.uniform(0.3, 0.4)), float(rng.uniform(0, 2 * math.pi))
        amp2, phase2 = float(rng.uniform(0.1, 0.15)), float(rng.uniform(0, 2 * math.pi))
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        wobble = 1 + amp * np.sin(k * angles + phase) + amp2 * np.sin((k + 1) * angles + phase2)
        radii = r * wobble / wobble.max()  # the outer radius is r, as for every other shape
        points = zip(radii, angles, strict=True)
        return [(cx + float(rr) * math.cos(a), cy + float(rr) * math.sin(a)) for rr, a in points]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + (DISTRACTOR_SHAPE,)}")


def render(concept: Concept, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `concept` at a random size and position, anti-aliased, as a `size` px RGB image."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[concept.background])
    r = big * float(rng.uniform(0.22, 0.40))
    margin = r * 1.02
    cx, cy = (float(rng.uniform(margin, big - margin)) for _ in range(2))
    draw = ImageDraw.Draw(image)
    fill = COLOURS[concept.colour]
    if concept.shape == "circle":
        draw.ellipse((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    else:
        draw.polygon(_polygon(concept.shape, cx, cy, r, rng), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def sample(concepts: list[Concept], count: int, seed: int) -> list[tuple[Image.Image, str, Concept]]:
    """`count` (image, caption, concept) rows cycling through `concepts`, captions from random templates."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        concept = concepts[index % len(concepts)]
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        rows.append((render(concept, rng), concept.caption(template), concept))
    return rows


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Stack PIL images into a float32 NCHW array in [-1, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32) for im in images]).transpose(0, 3, 1, 2) / 127.5 - 1.0
