"""The procedural world behind the demo: coloured shapes on textured backgrounds.

One module defines it so the demo source, the captions and (later) the world's own classifier agree.
A class is a (shape, colour) pair; background colour, texture, position, scale, rotation and pixel
noise vary per image, so classes are learnable but not trivial.  Drawing is a pure function of a
seed: the same seed gives the same pixels on every machine (numpy + PIL only, no floats from the OS).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from fillup_data.inversion.templates import TEMPLATES as _TI_TEMPLATES

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 190),
    "cyan": (60, 210, 220),
    "white": (245, 245, 245),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (110, 110, 110),
    "brown": (105, 70, 40),
    "navy": (20, 30, 80),
}
TEXTURES = ("blocky", "stripes", "pixel")

# Harder backgrounds (``draw(..., hard=True)``; the miniature experiment's real images, and a share of
# the generator's pretraining so it can draw them): four more background colours, each near a shape
# colour's hue (maroon~red, olive~yellow, teal~cyan, plum~purple), textures 1.6x as strong, and 1-3
# small distractor shapes of other (shape, colour) pairs ("clutter") under the class's shape. The
# distractors are at most 0.13 of the image wide against the class shape's 0.17-0.33, so the label
# stays the largest shape; a caption names such a background "cluttered".
HARD_BACKGROUNDS = {
    "maroon": (110, 30, 30),
    "olive": (95, 95, 25),
    "teal": (20, 95, 100),
    "plum": (85, 40, 95),
}
HARD_TEXTURE_STRENGTH = 1.6
CLUTTER_RADIUS = (0.07, 0.13)
CLUTTER_WORD = "cluttered"

_SUPERSAMPLE = 4


def world_classes(n: int) -> list[tuple[str, str]]:
    """The first ``n`` (shape, colour) classes, spread so neighbours differ in both shape and colour."""
    colours = list(COLOURS)
    pairs = []
    for i in range(len(SHAPES) * len(colours)):
        s = i % len(SHAPES)
        c = (i + i // len(SHAPES) * 3) % len(colours)
        pairs.append((SHAPES[s], colours[c]))
    if n > len(pairs):
        raise ValueError(f"the world has {len(pairs)} classes, {n} asked")
    return pairs[:n]


def class_name(shape: str, colour: str) -> str:
    return f"{colour} {shape}"


def parse_class_name(name: str) -> tuple[str, str]:
    """``class_name``'s inverse: "red circle" -> ("circle", "red"); ValueError naming what is unknown."""
    parts = name.split()
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
        raise ValueError(f"{name!r} is not \"COLOUR SHAPE\" with a colour of {', '.join(COLOURS)} "
                         f"and a shape of {', '.join(SHAPES)}")
    return parts[1], parts[0]


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None):
    pts = []
    k = n * 2 if inner else n
    for i in range(k):
        rr = r if (inner is None or i % 2 == 0) else r * inner
        a = rot + 2 * math.pi * i / k
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, int(r * 0.38)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rot + math.pi / 4), fill=fill)
    elif shape == "diamond":
        # a diamond is a square stretched along one axis, so it differs from a rotated square
        pts = [
            (cx + r * 0.75 * math.cos(rot), cy + r * 0.75 * math.sin(rot)),
            (cx + r * 1.3 * math.cos(rot + math.pi / 2), cy + r * 1.3 * math.sin(rot + math.pi / 2)),
            (cx + r * 0.75 * math.cos(rot + math.pi), cy + r * 0.75 * math.sin(rot + math.pi)),
            (cx + r * 1.3 * math.cos(rot + 1.5 * math.pi), cy + r * 1.3 * math.sin(rot + 1.5 * math.pi)),
        ]
        draw.polygon(pts, fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.25, 3, rot), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.1, 6, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.35, 5, rot, inner=0.42), fill=fill)
    elif shape == "cross":
        w = r * 0.42
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy, dx
            pts = [
                (cx + dx * r * 1.25 + px * w, cy + dy * r * 1.25 + py * w),
                (cx - dx * r * 1.25 + px * w, cy - dy * r * 1.25 + py * w),
                (cx - dx * r * 1.25 - px * w, cy - dy * r * 1.25 - py * w),
                (cx + dx * r * 1.25 - px * w, cy + dy * r * 1.25 - py * w),
            ]
            draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int, base: tuple[int, int, int], texture: str,
                strength: float = 1.0) -> np.ndarray:
    base_arr = np.array(base, dtype=np.float32)
    if texture == "blocky":
        cells = int(rng.integers(3, 7))
        noise = rng.normal(0.0, 28.0, size=(cells, cells, 3)).astype(np.float32)
        block = np.kron(noise, np.ones((size // cells + 1, size // cells + 1, 1), dtype=np.float32))
        field = block[:size, :size]
    elif texture == "stripes":
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(2.0, 6.0) * 2 * math.pi / size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * freq + rng.uniform(0, 6.28))
        field = (wave[..., None] * rng.uniform(18.0, 35.0)).astype(np.float32)
    else:  # pixel noise
        field = rng.normal(0.0, 22.0, size=(size, size, 3)).astype(np.float32)
    return np.clip(base_arr + field * strength, 0, 255)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    """Coverage ``[size, size, 1]`` in [0, 1] of a shape drawn at ``_SUPERSAMPLE`` times the size."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, rot, 255)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0


def _clutter(rng: np.random.Generator, shape: str, colour: str, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """1-3 distractors ``(mask, fill)``: small shapes of any (shape, colour) pair but the class's own."""
    big = size * _SUPERSAMPLE
    others = [(s, c) for s in SHAPES for c in COLOURS if (s, c) != (shape, colour)]
    out = []
    for _ in range(int(rng.integers(1, 4))):
        s, c = others[int(rng.integers(len(others)))]
        r = big * rng.uniform(*CLUTTER_RADIUS)
        cx, cy = rng.uniform(r, big - r, size=2)
        fill = np.clip(np.array(COLOURS[c]) + rng.integers(-18, 19, size=3), 0, 255).astype(np.float32)
        out.append((_shape_mask(s, size, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill[None, None, :]))
    return out


def draw(shape: str, colour: str, seed: int | np.random.SeedSequence, size: int = 32, hard: bool = False) -> tuple[Image.Image, dict]:
    """Draw one image of (shape, colour) and return it with its nuisance attributes.

    ``hard``: the harder backgrounds (``HARD_BACKGROUNDS``, stronger textures, clutter). Its extra
    draws come from a child of the image's seed, so ``hard=False`` images are the same pixels as before
    the option existed.
    """
    rng = np.random.default_rng(seed)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    big = size * _SUPERSAMPLE
    bg_jitter = rng.integers(-12, 13, size=3)
    clutter = []
    if hard:
        hrng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
        palette = {**BACKGROUNDS, **HARD_BACKGROUNDS}
        background = list(palette)[int(hrng.integers(len(palette)))]
        clutter = _clutter(hrng, shape, colour, size)
    base = {**BACKGROUNDS, **HARD_BACKGROUNDS}[background]
    bg = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(base, bg_jitter))
    r = big * rng.uniform(0.17, 0.33)
    margin = r * 1.3
    cx = rng.uniform(margin, big - margin)
    cy = rng.uniform(margin, big - margin)
    rot = rng.uniform(0, 2 * math.pi)
    jitter = rng.integers(-18, 19, size=3)
    fill = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[colour], jitter))
    small_mask = _shape_mask(shape, size, cx, cy, r, rot)
    back = _background(rng, size, bg, texture, strength=HARD_TEXTURE_STRENGTH if hard else 1.0)
    for m, f in clutter:
        back = back * (1 - m) + f * m
    fg = np.array(fill, dtype=np.float32)[None, None, :]
    img = back * (1 - small_mask) + fg * small_mask
    img = img + rng.normal(0.0, 4.0, size=img.shape)
    arr = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    meta = {"shape": shape, "colour": colour, "background": background, "texture": texture, "clutter": len(clutter)}
    return Image.fromarray(arr, "RGB"), meta


def longtail_counts(num_classes: int, max_images: int, min_images: int) -> list[int]:
    """Exponential imbalance from ``max_images`` (class 0) down to ``min_images`` (last class)."""
    if num_classes == 1:
        return [max_images]
    ratio = min_images / max_images
    return [
        max(min_images, int(math.floor(max_images * ratio ** (i / (num_classes - 1)) + 1e-9)))
        for i in range(num_classes)
    ]


# ---------------------------------------------------------------------------------------------
# Captions and the pretraining sampler of the toyworld generator (issue 6).

# (shape, colour) pairs never shown to the generator in pretraining. One per shape and one per
# colour, so every shape and every colour is still seen in 7 other combinations. The demo's tail
# classes (``world_classes(10)[6:]``: white diamond, orange hexagon, yellow circle, purple square)
# are among them, so the demo's few-shot classes are ones the generator can only reach by
# composing words it knows, or by Textual Inversion from the class's few images.
HELD_OUT = (
    ("diamond", "white"),
    ("hexagon", "orange"),
    ("circle", "yellow"),
    ("square", "purple"),
    ("star", "red"),
    ("triangle", "cyan"),
    ("cross", "green"),
    ("ring", "blue"),
)

# The generic noun: "a red object" teaches the generator that "object" means "some shape", which
# makes it a neutral starting point for Textual Inversion's init word (it names no class).
GENERIC_SHAPE = "object"

# The prompt prefixes Textual Inversion trains with and generation uses ("a photo of a {token}"):
# derived from the one template list, so the generator has seen exactly those words around a class phrase.
CAPTION_PREFIXES = tuple(t.removesuffix(" {token}") for t in _TI_TEMPLATES)
assert not any("{" in p for p in CAPTION_PREFIXES)  # every template ends in its placeholder


def world_words() -> list[str]:
    """Every word a caption can contain (the toyworld tokenizer makes each one token)."""
    words = set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(HARD_BACKGROUNDS)
    words |= {GENERIC_SHAPE, CLUTTER_WORD, "a", "an", "on", "background"}
    for prefix in CAPTION_PREFIXES:
        words.update(prefix.replace("-", " ").split())
    return sorted(words)


def pretraining_combos() -> list[tuple[str, str]]:
    """All (shape, colour) pairs except ``HELD_OUT``."""
    held = set(HELD_OUT)
    return [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in held]


def article(word: str) -> str:
    """"an orange star", "a red star"."""
    return "an" if word[0] in "aeiou" else "a"


def sample_caption(rng: np.random.Generator, shape: str, colour: str, background: str, cluttered: bool = False) -> str:
    """One caption of a drawn image; the mix of forms is fixed here so training is reproducible.

    ~10% empty (the unconditional branch of classifier-free guidance); otherwise the full
    "a red circle on a gray background", the short "a red circle" / "red circle", a TI-style
    prefix ("a photo of a red circle"), or a partial description with one attribute left out
    ("a red object", "a circle") so that each word carries its own meaning. A ``cluttered`` image's
    background reads "a cluttered teal background".
    """
    if cluttered:
        background = f"{CLUTTER_WORD} {background}"
    u = rng.random()
    if u < 0.10:
        return ""
    noun = f"{colour} {shape}"
    art = article(colour)
    if u < 0.35:
        return f"{art} {noun} on a {background} background"
    if u < 0.50:
        return f"{art} {noun}"
    if u < 0.60:
        return noun
    if u < 0.80:
        return f"{CAPTION_PREFIXES[int(rng.integers(len(CAPTION_PREFIXES)))]} {noun}"
    if u < 0.90:
        return f"{art} {colour} {GENERIC_SHAPE}" + (f" on a {background} background" if rng.random() < 0.5 else "")
    return f"a {shape}" + (f" on a {background} background" if rng.random() < 0.5 else "")


def sample_world(seed: int, n: int, size: int = 32, combos: list[tuple[str, str]] | None = None,
                 hard_fraction: float = 0.0):
    """``n`` pretraining examples: uint8 images ``[n, size, size, 3]``, captions, and (shape, colour)
    index pairs (into ``SHAPES``/``COLOURS``). Deterministic in ``seed``; held-out pairs never appear
    unless ``combos`` names them. ``hard_fraction`` of the images (in expectation) have the harder
    backgrounds; at 0 the stream is the one from before the option existed."""
    combos = pretraining_combos() if combos is None else list(combos)
    rng = np.random.default_rng([seed, 0x70])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    labels = np.empty((n, 2), dtype=np.int64)
    for i in range(n):
        shape, colour = combos[int(rng.integers(len(combos)))]
        hard = bool(hard_fraction > 0 and rng.random() < hard_fraction)
        img, meta = draw(shape, colour, [seed, 0x71, i], size=size, hard=hard)
        images[i] = np.asarray(img)
        captions.append(sample_caption(rng, shape, colour, meta["background"], cluttered=hard))
        labels[i] = (SHAPES.index(shape), list(COLOURS).index(colour))
    return images, captions, labels
