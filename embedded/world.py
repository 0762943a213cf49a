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
    "yellow": (235, 230, 35),
    "green": (35, 165, 65),
    "blue": (35, 85, 215),
}
ADAPTER_COLOURS = {"purple": (140, 40, 190)}
COLOURS = {**BASE_COLOURS, **ADAPTER_COLOURS}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}
DISTRACTOR_SHAPE = "blob"
HELDOUT_COMBOS = (("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "square"))

CANONICAL_TEMPLATE = "{a} {colour} {shape} on a {background} background"

# The caption grammar: a training caption takes one option from each slot, drawn with these weights, so the text
# encoder and the UNet learn the words rather than one sentence (issue: "a purple star" drew no purple at all while
# every caption was one of three fixed templates). "{a}" is the article of the word after it ("a" or "an").
LEADS = (("", 6), ("a picture of ", 1), ("an image of ", 1))
ARTICLES = (("{a} ", 3), ("", 2))
EXTRAS = (("", 6), ("simple ", 1), ("centered ", 1))
CORES = (("{colour} {shape}", 5), ("{shape} in {colour}", 1))
# A third of the captions name no background, so a prompt without one draws either.
BACKGROUND_PHRASES = (
    ("", 3),
    (" on a {background} background", 3),
    (" on {background}", 1),
    (" against {background}", 1),
    (" with a {background} background", 1),
    (", {background} background", 1),
)
# Phrasings the grammar never makes, written down here and never trained on: they measure how far the words
# generalise beyond the training sentences (tests assert none of them is a grammar sentence). They use only words
# the grammar uses, in orders or combinations it never does.
HELDOUT_PHRASINGS = (
    "{colour} {shape} against a {background} background",
    "an image of {colour} {shape} with {background} background",
    "{a} {colour} {shape}, {background}",
    "{a} simple centered {colour} {shape}",
)


@dataclass(frozen=True)
class Concept:
    """One captionable combination of shape, colour and background."""

    shape: str
    colour: str
    background: str

    def caption(self, template: str = CANONICAL_TEMPLATE) -> str:
        """The caption of this concept under `template` (the canonical one by default)."""
        return _fill(template, self.colour, self.shape, self.background)

    def phrase(self, rng: np.random.Generator) -> str:
        """A caption drawn from the grammar: one weighted option per slot."""
        slots = (LEADS, ARTICLES, EXTRAS, CORES, BACKGROUND_PHRASES)
        return self.caption("".join(_weighted(options, rng) for options in slots))


@dataclass(frozen=True)
class Description:
    """What a caption says: a colour and a shape, and a background or None when it names none."""

    colour: str
    shape: str
    background: str | None

    def fits(self, concept: Concept) -> bool:
        """True when an image of `concept` shows what this description says (any background if it names none)."""
        same_background = self.background is None or self.background == concept.background
        return self.colour == concept.colour and self.shape == concept.shape and same_background


def article(word: str) -> str:
    """The indefinite article before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def _fill(template: str, colour: str, shape: str, background: str) -> str:
    """Fill a template; "{a}" becomes the article of the word that follows it."""
    text = template.format(colour=colour, shape=shape, background=background, a="{a}")
    while "{a}" in text:
        head, tail = text.split("{a}", 1)
        text = head + article(tail.split()[0]) + tail
    return text


def _weighted(options: tuple[tuple[str, int], ...], rng: np.random.Generator) -> str:
    weights = np.array([weight for _, weight in options], dtype=float)
    return options[int(rng.choice(len(options), p=weights / weights.sum()))][0]


def grammar_templates() -> list[str]:
    """Every sentence template the grammar can make (one option per slot), in slot order."""
    return [
        lead + art + extra + core + background
        for lead, _ in LEADS
        for art, _ in ARTICLES
        for extra, _ in EXTRAS
        for core, _ in CORES
        for background, _ in BACKGROUND_PHRASES
    ]


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
    """Every word the caption grammar uses, so each becomes one token."""
    words = set()
    for concept in all_concepts():
        for template in grammar_templates():
            words.update(concept.caption(template).replace(",", " , ").split())
    return sorted(words)


def parse_caption(text: str) -> Description | None:
    """What a caption of this world says, whatever its phrasing; None if it names no colour or no shape."""
    words = text.lower().replace(",", " ").split()
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in (*SHAPES, DISTRACTOR_SHAPE)]
    backgrounds = [w for w in words if w in BACKGROUNDS]
    if len(colours) != 1 or len(shapes) != 1 or len(backgrounds) > 1:
        return None
    return Description(colours[0], shapes[0], backgrounds[0] if backgrounds else None)


def same_meaning(prompt: str, candidate: str) -> bool:
    """True when `candidate` (a caption naming colour, shape and background) shows what `prompt` asks for.

    A prompt that names no background is met by either background: its R-precision counts colour and shape.
    """
    wanted, offered = parse_caption(prompt), parse_caption(candidate)
    if wanted is None or offered is None or offered.background is None:
        return False
    return wanted.fits(Concept(offered.shape, offered.colour, offered.background))


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
    """`count` (image, caption, concept) rows cycling through `concepts`, captions drawn from the grammar."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        concept = concepts[index % len(concepts)]
        rows.append((render(concept, rng), concept.phrase(rng), concept))
    return rows


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Stack PIL images into a float32 NCHW array in [-1, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32) for im in images]).transpose(0, 3, 1, 2) / 127.5 - 1.0
