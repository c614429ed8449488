"""The shapes world: one patterned object on a background per image, with an English caption.

Everything is deterministic by seed and uses numpy and PIL only. An image is described by a
`Scene` (shape, colour, pattern, background, size, position, rotation); `render(scene)` draws it
at 4x the target size and downsamples (anti-aliased edges), `caption(scene, rng)` writes one of a
few templates ("a red striped star on a navy background"), with attributes dropped at random so
the model also learns partial prompts ("a photo of a star", "a red shape on a teal background").

What pretraining never sees (so it can be measured):
- `CONCEPT_SHAPES` (heart, crescent) and the two-tone `halves` pattern: personalization concepts
  are built from them (`CONCEPTS`), so a subject really is new to the model;
- `HELD_OUT_PAIRS`: one object colour per shape, for the base model's compositional test.
The judge (`personalize.shapes.judge`) is trained on the whole world, concepts included.

Two tiers of personalization subjects: `CONCEPTS` (the new-outline tier, "outlines": a shape or
pattern pretraining never drew) and `SUBJECTS` (the subject tier: only parts pretraining drew, some
on held-out pairs, as DreamBooth's dog is made of things the model can draw), the latter split into a
tuning set (settings are chosen on it) and an evaluation set (tables report it).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32  # px: the `shapes` model's native size (latents 16x16 with its 2x VAE)
SUPERSAMPLE = 4  # drawn at 128 px, downsampled with a box filter: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
CONCEPT_SHAPES = ("heart", "crescent")  # never in pretraining
ALL_SHAPES = SHAPES + CONCEPT_SHAPES

COLOURS = {
    "red": (220, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 235),
    "purple": (140, 50, 200),
    "pink": (250, 130, 190),
    "white": (245, 245, 245),
}
PATTERNS = ("solid", "striped", "dotted")
CONCEPT_PATTERNS = ("halves",)  # two-tone: never in pretraining
ALL_PATTERNS = PATTERNS + CONCEPT_PATTERNS
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (110, 70, 40),
    "teal": (0, 128, 128),
    "navy": (20, 25, 90),
    "beige": (225, 210, 170),
    "checkered": None,  # a texture: gray and light-gray cells
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)

# One colour per shape is never drawn on that shape in pretraining (8 of 64 pairs).
HELD_OUT_PAIRS = frozenset((s, COLOUR_NAMES[(3 * i + 1) % len(COLOUR_NAMES)]) for i, s in enumerate(SHAPES))

CLASS_NOUN = "shape"  # the generic noun the captions use when the shape name is dropped


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    pattern: str
    background: str
    size: float  # object radius as a fraction of the image side
    x: float  # centre, fractions of the image side
    y: float
    angle: float  # degrees

    def to_dict(self) -> dict:
        return asdict(self)


OUTLINES, SUBJECT_TIER = "outlines", "subjects"  # the two tiers of personalization subjects
TIERS = (SUBJECT_TIER, OUTLINES)
TUNING, EVALUATION = "tuning", "evaluation"  # the subject tier's splits
SPLITS = (TUNING, EVALUATION)


@dataclass(frozen=True)
class Concept:
    """A personalization subject: in the new-outline tier one the pretrained model has never seen, in
    the subject tier one made of parts it has drawn (with its `split`)."""

    name: str
    shape: str
    colour: str
    pattern: str
    description: str
    tier: str = OUTLINES
    split: str = ""  # the subject tier's TUNING or EVALUATION; the new-outline tier has none


CONCEPTS = (
    Concept("pink-heart", "heart", "pink", "solid", "a pink heart (a shape pretraining never draws)"),
    Concept("dotted-crescent", "crescent", "yellow", "dotted", "a yellow dotted crescent (a new shape)"),
    Concept("halves-hexagon", "hexagon", "blue", "halves", "a blue/white two-tone hexagon (a new pattern)"),
)


def _subject(shape: str, colour: str, pattern: str, split: str) -> Concept:
    held_out = ", a (shape, colour) pair pretraining never drew" if (shape, colour) in HELD_OUT_PAIRS else ""
    description = f"a {colour} {pattern} {shape} (parts pretraining drew{held_out})"
    return Concept(f"{colour}-{pattern}-{shape}", shape, colour, pattern, description, SUBJECT_TIER, split)


SUBJECTS = (
    _subject("star", "red", "striped", TUNING),
    _subject("circle", "orange", "dotted", TUNING),  # held-out pair
    _subject("triangle", "green", "solid", TUNING),
    _subject("square", "blue", "striped", EVALUATION),  # held-out pair
    _subject("diamond", "yellow", "dotted", EVALUATION),
    _subject("ring", "purple", "solid", EVALUATION),  # held-out pair
    _subject("cross", "pink", "striped", EVALUATION),
)


def subjects(split: str | None = None) -> list[Concept]:
    """The subject tier's concepts of `split` (None: both splits)."""
    return [s for s in SUBJECTS if split is None or s.split == split]


# Instance photos of a concept show it on these backgrounds; it is then prompted on the others.
INSTANCE_BACKGROUNDS = ("black", "gray", "brown", "beige")
UNSEEN_BACKGROUNDS = ("teal", "navy", "checkered")


def concept_by_name(name: str) -> Concept:
    """A concept of either tier by its name (KeyError if none)."""
    for concept in CONCEPTS + SUBJECTS:
        if concept.name == name:
            return concept
    raise KeyError(name)


def random_scene(
    rng: np.random.Generator,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = COLOUR_NAMES,
    patterns: tuple[str, ...] = PATTERNS,
    backgrounds: tuple[str, ...] = BACKGROUND_NAMES,
    exclude_pairs: frozenset = frozenset(),
) -> Scene:
    """A random scene over the given attribute values, skipping `exclude_pairs` (shape, colour)."""
    while True:
        shape = shapes[rng.integers(len(shapes))]
        colour = colours[rng.integers(len(colours))]
        if (shape, colour) not in exclude_pairs:
            break
    return Scene(
        shape=shape,
        colour=colour,
        pattern=patterns[rng.integers(len(patterns))],
        background=backgrounds[rng.integers(len(backgrounds))],
        **jitter(rng),
    )


def jitter(rng: np.random.Generator) -> dict:
    """Size, position and rotation: the object always fits inside the image."""
    size = float(rng.uniform(0.26, 0.40))
    margin = size + 0.03
    return dict(
        size=size,
        x=float(rng.uniform(margin, 1 - margin)),
        y=float(rng.uniform(margin, 1 - margin)),
        angle=float(rng.uniform(-15, 15)),
    )


def pretraining_scene(rng: np.random.Generator) -> Scene:
    """A scene of the pretraining distribution: no concept shape or pattern, no held-out pair."""
    return random_scene(rng, exclude_pairs=HELD_OUT_PAIRS)


def concept_scene(concept: Concept, rng: np.random.Generator, backgrounds: tuple[str, ...] = BACKGROUND_NAMES) -> Scene:
    return Scene(concept.shape, concept.colour, concept.pattern, backgrounds[rng.integers(len(backgrounds))], **jitter(rng))


def write_instance_images(
    concept: Concept,
    folder,
    count: int = 4,
    seed: int = 0,
    resolution: int = 128,
    backgrounds: tuple[str, ...] = INSTANCE_BACKGROUNDS,
    mask_path: Callable | None = None,
) -> list:
    """`count` PNGs of `concept` at varied positions and sizes, one per entry of `backgrounds` in turn,
    drawn at `resolution` px (training resizes them); returns their paths. With `mask_path` (image
    path -> mask path), each image's object mask is written there too (white = the object)."""
    from pathlib import Path

    rng = np.random.default_rng(_instance_stream(concept, seed))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        bg = backgrounds[i % len(backgrounds)]
        scene = Scene(concept.shape, concept.colour, concept.pattern, bg, **jitter(rng))
        path = folder / f"{concept.name}-{i + 1}.png"
        image, mask = render_with_mask(scene, resolution)
        image.save(path)
        if mask_path is not None:
            mask.save(mask_path(path))
        paths.append(path)
    return paths


def _instance_stream(concept: Concept, seed: int) -> list[int]:
    """The seed sequence of a concept's instance images: the new-outline tier by its place in `CONCEPTS`
    (as before the subject tier existed), a subject by a checksum of its name (stable whatever the order)."""
    if concept.tier == OUTLINES:
        return [seed, CONCEPTS.index(concept)]
    return [seed, 1, zlib.crc32(concept.name.encode())]


# --- captions ---------------------------------------------------------------------------------
TEMPLATES = (
    "{a} {colour} {pattern} {shape} on {bg}",
    "a photo of {a} {colour} {pattern} {shape} on {bg}",
    "{a} {pattern} {colour} {shape}, {bg}",
)
PATTERN_WORDS = {"solid": "solid", "striped": "striped", "dotted": "dotted", "halves": "two-tone"}
DROP = 0.15  # chance of leaving out each of colour, pattern, background, and of saying "shape"


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """An English caption of `scene`; with `rng`, a random template and random attribute dropout,
    without it the full first template."""
    keep = (lambda: True) if rng is None else (lambda: rng.random() >= DROP)
    template = TEMPLATES[0] if rng is None else TEMPLATES[rng.integers(len(TEMPLATES))]
    colour = scene.colour if keep() else ""
    pattern = PATTERN_WORDS[scene.pattern] if keep() else ""
    shape = scene.shape if keep() else CLASS_NOUN
    bg = f"a {scene.background} background" if keep() else ""
    text = template.format(a="{a}", colour=colour, pattern=pattern, shape=shape, bg=bg)
    if not bg:
        text = text.replace(" on ", " ").replace(", ", " ")
    words = text.split()
    first = next(w for w in words if w not in ("a", "photo", "of", "{a}"))
    text = " ".join(words).replace("{a}", "an" if first[0] in "aeiou" else "a")
    return text.strip(" ,")


def prompt(shape: str = CLASS_NOUN, colour: str = "", pattern: str = "", background: str = "") -> str:
    """The canonical prompt for the given attributes (empty = unspecified)."""
    words = [colour, PATTERN_WORDS.get(pattern, pattern), shape]
    text = " ".join(w for w in words if w)
    article = "an" if text[0] in "aeiou" else "a"
    return f"{article} {text}" + (f" on a {background} background" if background else "")


# --- rendering --------------------------------------------------------------------------------
def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image of `resolution` px."""
    return render_with_mask(scene, resolution)[0]


def render_with_mask(scene: Scene, resolution: int = RESOLUTION) -> tuple[Image.Image, Image.Image]:
    """(image, mask): the mask is white where the object is (the subject), black elsewhere."""
    big = resolution * SUPERSAMPLE
    background = _background(scene.background, big)  # (big, big, 3) uint8
    mask = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask), scene, big)
    fill = _fill(scene, big)  # (big, big, 3) uint8
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    pixels = (fill * alpha + background * (1 - alpha)).round().astype(np.uint8)
    image = Image.fromarray(pixels).resize((resolution, resolution), Image.BOX)
    return image, mask.resize((resolution, resolution), Image.BOX)


def _background(name: str, size: int) -> np.ndarray:
    if name == "checkered":
        cell = size // 4
        yy, xx = np.mgrid[0:size, 0:size]
        light = ((yy // cell + xx // cell) % 2).astype(bool)
        out = np.where(light[..., None], np.uint8(185), np.uint8(95))
        return np.broadcast_to(out, (size, size, 3)).astype(np.float32)
    return np.broadcast_to(np.array(BACKGROUNDS[name], np.float32), (size, size, 3))


def _shade(rgb: tuple[int, int, int]) -> np.ndarray:
    """The darker tone patterns are drawn in."""
    return np.array(rgb, np.float32) * 0.4


def _fill(scene: Scene, size: int) -> np.ndarray:
    """The object's colour and pattern over the whole canvas (the shape mask cuts it out)."""
    base = np.array(COLOURS[scene.colour], np.float32)
    out = np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / 5.5  # about 6 px at 32 px
    if scene.pattern == "striped":
        out[(yy % period) < period / 2] = _shade(COLOURS[scene.colour])
    elif scene.pattern == "dotted":
        cy, cx = (yy % period) - period / 2, (xx % period) - period / 2
        out[cy**2 + cx**2 < (period * 0.27) ** 2] = _shade(COLOURS[scene.colour])
    elif scene.pattern == "halves":
        other = (30, 30, 30) if scene.colour == "white" else (245, 245, 245)
        out[xx >= scene.x * size] = other
    return out


def _polygon(points: list[tuple[float, float]], scene: Scene, size: int) -> list[tuple[float, float]]:
    """Unit-radius points rotated by the scene's angle, scaled and moved to its centre."""
    a = math.radians(scene.angle)
    r, cx, cy = scene.size * size, scene.x * size, scene.y * size
    return [(cx + r * (px * math.cos(a) - py * math.sin(a)), cy + r * (px * math.sin(a) + py * math.cos(a))) for px, py in points]


def _regular(n: int, start: float = -90.0, radius: float = 1.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start + 360 * k / n)), radius * math.sin(math.radians(start + 360 * k / n))) for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, size: int) -> None:
    r, cx, cy = scene.size * size, scene.x * size, scene.y * size
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = scene.shape
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        off = r * 0.45
        a = math.radians(scene.angle)
        ox, oy = cx + off * math.cos(a), cy + off * math.sin(a) - off * 0.3
        draw.ellipse((ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85), fill=0)
    elif shape == "square":
        draw.polygon(_polygon([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)], scene, size), fill=255)
    elif shape == "diamond":
        draw.polygon(_polygon([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)], scene, size), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon([(x, y + 0.15) for x, y in _regular(3)], scene, size), fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(_regular(6, start=0), scene, size), fill=255)
    elif shape == "star":
        outer, inner = _regular(5), _regular(5, start=-90 + 36, radius=0.45)
        draw.polygon(_polygon([p for pair in zip(outer, inner) for p in pair], scene, size), fill=255)
    elif shape == "cross":
        t = 0.32
        arm = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        draw.polygon(_polygon(arm, scene, size), fill=255)
    elif shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17 + 0.1))
        draw.polygon(_polygon(pts, scene, size), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(ALL_SHAPES)}")


# --- datasets ---------------------------------------------------------------------------------
def render_batch(scenes: list[Scene], resolution: int = RESOLUTION) -> np.ndarray:
    """(n, resolution, resolution, 3) uint8 images of the scenes."""
    return np.stack([np.asarray(render(s, resolution)) for s in scenes])


def pretraining_set(n: int, seed: int) -> list[Scene]:
    """`n` pretraining scenes from `seed` (the same list in every process)."""
    rng = np.random.default_rng(seed)
    return [pretraining_scene(rng) for _ in range(n)]
