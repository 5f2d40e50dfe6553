"""Procedural data with known answers: instruction shards and a MagnifierBench-style benchmark.

Every scene is a large image (long side 400-2000 px, aspect ratio 9:16 ... 16:9) drawn with PIL: a textured
background, muted clutter (lines, long bars, flat ellipses: never one of the target shapes, never a saturated
colour) and a few saturated distractor objects. The question is about a small target (about 1% of the image
area, or a group of 1-5 identical ones for counting):

- colour:   "What color is the small triangle ...?"   (no other triangle in the scene)
- shape:    "What shape is the small red object?"     (no other red object)
- count:    "How many red triangles ...?"             (distractors are neither red nor triangles)
- position: "Where is the small red triangle?"        (top left / top right / bottom left / bottom right;
                                                        the target sits well inside its quadrant)

so the answer is known exactly and needs the small object to be found. Train rows (shard schema) carry varied
phrasings with free-form answers, about a fifth of them multi-turn (2-3 questions about one scene); bench items
have four options (plausible distractors: colours/shapes that are in the scene, nearby counts, the other
quadrants) and the answer letter, in the exact parquet layout of the HF `Otter-AI/MagnifierBench` files.
JPEG and PNG both. The same seed gives the same bytes.

`num_bad` adds rows for the bad-input tests, cycling through `BAD_KINDS`. Rows that must be rejected have ids
`bad-<kind>-<k>`; rows that are odd but valid (RGBA / palette / 16-bit PNG, CMYK / EXIF-rotated JPEG: the
pipeline must convert, not reject them) have ids `odd-<kind>-<k>`. So "rejects == rows whose id starts with
`bad-`" is the check.

`write_mimicit` writes the same kind of scenes in the MIMIC-IT/Otter input format of `convert_mimicit`.
"""

from __future__ import annotations

import io
import json
import math
import random
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageOps

from otterhd_ray.data.shards import ShardWriter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 170, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 25),
    "orange": (250, 135, 20),
    "purple": (145, 50, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
KINDS = ("colour", "shape", "count", "position")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}

# (kind, must be rejected): the brief's list first, so num_bad=8 covers it.
BAD_KINDS: tuple[tuple[str, bool], ...] = (
    ("truncated_jpeg", True),
    ("random_bytes", True),
    ("empty_answer", True),
    ("missing_conversations", True),
    ("decompression_bomb", True),
    ("rgba_png", False),
    ("palette_png", False),
    ("png_16bit", False),
    ("empty_image", True),
    ("cmyk_jpeg", False),
    ("exif_rotated_jpeg", False),
)

# Same layout, key order and separators as the `huggingface` schema metadata of the HF MagnifierBench parquet.
HF_FEATURES = {
    "info": {
        "features": {
            "id": {"dtype": "string", "_type": "Value"},
            "instruction": {"dtype": "string", "_type": "Value"},
            "answer": {"dtype": "string", "_type": "Value"},
            "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
        }
    }
}
BENCH_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("answer", pa.string()),
        pa.field(
            "images", pa.list_(pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))
        ),
    ],
    metadata={"huggingface": json.dumps(HF_FEATURES)},
)
BENCH_FILE = "magnifierbench/data/test-00000-of-00001.parquet"
SOURCE = "synth"


@dataclass(frozen=True)
class Level:
    """How hard the scenes are. `standard` is MagnifierBench-like (a ~1% target among clutter and 3-6 saturated
    distractors on 400-2000 px frames); `easy` is what a tiny model learns in minutes on a CPU (the demo): a
    larger target, little clutter, one or two distractors, small frames."""

    target_area: tuple[float, float] = (0.007, 0.013)  # fraction of the frame the target (group) covers
    clutter: float = 1.0  # multiplier of the number of muted clutter strokes
    distractors: tuple[int, int] = (3, 6)  # saturated non-target objects drawn (fewer when they do not fit)
    train_long_side: tuple[int, int] = (400, 2000)
    bench_long_side: tuple[int, int] = (900, 2000)
    texture: bool = True  # noise-textured background; False: one flat muted colour
    aspect: tuple[float, float] = (9 / 16, 16 / 9)  # frame width / height, drawn log-uniformly in this range


LEVELS: dict[str, Level] = {
    "standard": Level(),
    "easy": Level(
        target_area=(0.12, 0.20), clutter=0.0, distractors=(0, 0), train_long_side=(200, 260),
        bench_long_side=(200, 260), texture=False, aspect=(1.0, 1.0),
    ),
}


def get_level(name: str) -> Level:
    if name not in LEVELS:
        raise ValueError(f"unknown synth level {name!r}; choose one of {sorted(LEVELS)}")
    return LEVELS[name]


# -------------------------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """A drawn scene and the facts its questions are about."""

    image: Image.Image
    kind: str
    colour: str
    shape: str
    count: int
    position: str | None
    distractor_colours: list[str] = field(default_factory=list)
    distractor_shapes: list[str] = field(default_factory=list)


def _size(
    rng: random.Random, long_min: int, long_max: int, aspects: tuple[float, float] = (9 / 16, 16 / 9)
) -> tuple[int, int]:
    long_side = rng.randint(long_min, long_max)
    aspect = math.exp(rng.uniform(math.log(aspects[0]), math.log(aspects[1])))  # width / height
    if aspect >= 1:
        return long_side, max(64, round(long_side / aspect))
    return max(64, round(long_side * aspect)), long_side


def _muted(rng: random.Random, lo: int = 50, hi: int = 210) -> tuple[int, int, int]:
    # Low saturation keeps clutter from ever looking like one of the named target colours.
    grey = rng.randint(lo, hi)
    return tuple(max(0, min(255, grey + rng.randint(-18, 18))) for _ in range(3))  # type: ignore[return-value]


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    # Noise drawn small and upscaled gives a cheap, soft texture over a whole 2000 px frame.
    # (Not Image.effect_noise: it draws from C's unseeded rand(), which would break same-seed-same-bytes.)
    gen = np.random.default_rng(rng.getrandbits(64))
    small = gen.normal(128, rng.uniform(20, 60), size=(max(1, height // 16), max(1, width // 16)))
    noise = Image.fromarray(small.clip(0, 255).astype(np.uint8))
    noise = noise.resize((width, height), Image.Resampling.BILINEAR)
    return ImageOps.colorize(noise, _muted(rng, 30, 110), _muted(rng, 140, 235))


def _draw_clutter(
    draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int, density: float = 1.0
) -> None:
    num = round(min(90, 12 + width * height // 40_000) * density)
    for _ in range(num):
        colour = _muted(rng)
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        kind = rng.random()
        if kind < 0.4:
            length = rng.uniform(0.05, 0.5) * max(width, height)
            angle = rng.uniform(0, math.pi)
            end = (x0 + length * math.cos(angle), y0 + length * math.sin(angle))
            draw.line([(x0, y0), end], fill=colour, width=rng.randint(1, 6))
        elif kind < 0.7:  # long bars (aspect >= 2.5: never read as a square)
            w = rng.uniform(0.08, 0.35) * width
            h = w / rng.uniform(2.5, 6)
            box = (x0, y0, x0 + w, y0 + h) if rng.random() < 0.5 else (x0, y0, x0 + h, y0 + w)
            draw.rectangle(box, fill=colour if rng.random() < 0.6 else None, outline=_muted(rng), width=2)
        else:  # flat ellipses (aspect >= 2: never read as a circle)
            w = rng.uniform(0.05, 0.25) * width
            h = w / rng.uniform(2, 4)
            draw.ellipse(
                (x0, y0, x0 + w, y0 + h), fill=colour if rng.random() < 0.5 else None, outline=_muted(rng)
            )


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, offset: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(offset + 2 * math.pi * k / n),
                cy + radius * math.sin(offset + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape == "square":  # axis-aligned, so it never looks like the diamond
        return [
            (cx - r * 0.8, cy - r * 0.8),
            (cx + r * 0.8, cy - r * 0.8),
            (cx + r * 0.8, cy + r * 0.8),
            (cx - r * 0.8, cy + r * 0.8),
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "triangle":
        return ring(3, r, rot)
    if shape == "hexagon":
        return ring(6, r, rot)
    if shape == "star":
        outer, inner = ring(5, r, rot - math.pi / 2), ring(5, r * 0.45, rot - math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    raise AssertionError(shape)


def _draw_object(
    draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float, rot: float
):
    fill, outline = COLOURS[colour], (25, 25, 25)
    width = max(1, round(r / 12))
    if shape == "circle":
        draw.ellipse(
            (cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85),
            fill=fill,
            outline=outline,
            width=width,
        )
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill, outline=outline, width=width)


def _place(
    rng: random.Random,
    r: float,
    region: tuple[float, float, float, float],
    taken: list[tuple[float, float, float]],
) -> tuple[float, float] | None:
    x0, y0, x1, y1 = region
    for _ in range(60):
        cx, cy = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
        if all(math.hypot(cx - x, cy - y) > r + rr + 4 for x, y, rr in taken):
            taken.append((cx, cy, r))
            return cx, cy
    return None


def _quadrant_region(position: str, width: int, height: int) -> tuple[float, float, float, float]:
    # Keep the target well away from the centre lines so "top left" etc. is never a judgement call.
    gap_x, gap_y = 0.08 * width, 0.08 * height
    left = position.endswith("left")
    top = position.startswith("top")
    x = (0.0, width / 2 - gap_x) if left else (width / 2 + gap_x, float(width))
    y = (0.0, height / 2 - gap_y) if top else (height / 2 + gap_y, float(height))
    return x[0], y[0], x[1], y[1]


def draw_scene(
    rng: random.Random, kind: str, long_min: int = 400, long_max: int = 2000, level: Level = LEVELS["standard"]
) -> Scene:
    """Draw one scene whose `kind` question has a known answer (the frame size from `long_min`/`long_max`)."""
    width, height = _size(rng, long_min, long_max, level.aspect)
    image = _background(rng, width, height) if level.texture else Image.new("RGB", (width, height), _muted(rng))
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, width, height, level.clutter)

    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count = rng.randint(1, 5) if kind == "count" else 1
    area = rng.uniform(*level.target_area) * width * height  # ~1% of the frame (standard), shared by a group
    r = max(6.0, 0.5 * math.sqrt(area / count))
    taken: list[tuple[float, float, float]] = []
    position = rng.choice(POSITIONS) if kind != "count" else None
    region = (
        _quadrant_region(position, width, height) if position else (0.0, 0.0, float(width), float(height))
    )
    targets = []
    for _ in range(count):
        spot = _place(rng, r, region, taken)
        if spot is None:  # tiny frames: shrink rather than fail; the answer stays exact
            r = max(4.0, r * 0.7)
            spot = _place(rng, r, region, taken) or (region[0] + r + len(targets) * 2 * r, region[1] + r)
        targets.append(spot)

    other_colours = [c for c in COLOURS if c != colour]
    other_shapes = [s for s in SHAPES if s != shape]
    distractor_colours, distractor_shapes = [], []
    for _ in range(rng.randint(*level.distractors)):
        d_colour, d_shape = rng.choice(other_colours), rng.choice(other_shapes)
        d_r = r * rng.uniform(0.7, 1.6)
        spot = _place(rng, d_r, (0.0, 0.0, float(width), float(height)), taken)
        if spot is None:
            continue
        _draw_object(draw, d_shape, d_colour, *spot, d_r, rng.uniform(0, 2 * math.pi))
        distractor_colours.append(d_colour)
        distractor_shapes.append(d_shape)
    for cx, cy in targets:
        _draw_object(draw, shape, colour, cx, cy, r, rng.uniform(0, 2 * math.pi))
    return Scene(image, kind, colour, shape, count, position, distractor_colours, distractor_shapes)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)  # level 1: 2000 px frames stay fast to write
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- text
def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "es" if shape.endswith("s") else shape + "s"


def _question(rng: random.Random, scene: Scene, kind: str, follow_up: bool = False) -> tuple[str, str]:
    """One (question, free-form answer) pair of `kind` about the scene."""
    c, s, n, p = scene.colour, scene.shape, scene.count, scene.position
    if kind == "colour":
        q = rng.choice(
            [
                f"What color is the small {s} in the image?",
                f"Which colour does the little {s} have?",
                f"Find the tiny {s}. What color is it?",
                f"There is a small {s} somewhere in this picture. What is its color?",
            ]
        )
        a = rng.choice([f"The {s} is {c}.", f"It is {c}.", f"{c.capitalize()}."])
    elif kind == "shape":
        q = rng.choice(
            [
                f"What shape is the small {c} object?",
                f"Which shape is drawn in {c}?",
                f"Look for the {c} object. What shape does it have?",
            ]
        )
        a = rng.choice([f"It is a {s}.", f"The {c} object is a {s}.", f"A {s}."])
    elif kind == "count":
        q = rng.choice(
            [
                f"How many {c} {_plural(s, 2)} are there in the image?",
                f"Count the small {c} {_plural(s, 2)}. How many are there?",
                f"How many {c} {_plural(s, 2)} can you find?",
            ]
        )
        verb = "is" if n == 1 else "are"
        a = rng.choice([f"There {verb} {NUMBER_WORDS[n]} {c} {_plural(s, n)}.", f"{n}."])
    elif kind == "position":
        subject = "it" if follow_up else f"the small {c} {s}"
        q = rng.choice([f"Where is {subject} in the image?", f"In which part of the image is {subject}?"])
        q = q[0].upper() + q[1:]
        a = rng.choice(
            [f"It is in the {p} of the image.", f"The {c} {s} is at the {p}.", f"{p.capitalize()}."]
        )
    else:
        raise AssertionError(kind)
    return q, a


def _conversation(rng: random.Random, scene: Scene) -> list[dict[str, str]]:
    kinds = [scene.kind]
    if scene.kind != "count" and rng.random() < 1 / 3:
        others = [k for k in ("colour", "shape", "position") if k != scene.kind]
        kinds += rng.sample(others, rng.randint(1, 2))
    turns = []
    for i, kind in enumerate(kinds):
        q, a = _question(rng, scene, kind, follow_up=i > 0)
        turns += [{"role": "user", "text": q}, {"role": "assistant", "text": a}]
    return turns


def _options(rng: random.Random, scene: Scene) -> tuple[str, list[str], str]:
    """(question, four options, correct option text) for a benchmark item."""
    if scene.kind == "colour":
        q, truth = f"What color is the small {scene.shape} in the image?", scene.colour
        # Colours that are in the scene make the best distractors: the model must find the right object.
        pool = list(dict.fromkeys(scene.distractor_colours)) + [c for c in COLOURS if c != truth]
    elif scene.kind == "shape":
        q, truth = f"What shape is the small {scene.colour} object in the image?", scene.shape
        pool = list(dict.fromkeys(scene.distractor_shapes)) + [s for s in SHAPES if s != truth]
    elif scene.kind == "count":
        truth = str(scene.count)
        q = f"How many {scene.colour} {_plural(scene.shape, 2)} are there in the image?"
        pool = [
            str(k) for k in sorted(range(1, 8), key=lambda k: (abs(k - scene.count), k)) if k != scene.count
        ]
        pool = pool[:4]
    else:
        truth = scene.position
        q = f"Where is the small {scene.colour} {scene.shape} in the image?"
        pool = [p for p in POSITIONS if p != truth]
    distractors: list[str] = []
    for option in pool:
        if option != truth and option not in distractors:
            distractors.append(option)
    distractors = rng.sample(distractors[:4], 3) if len(distractors) > 3 else distractors
    options = [truth, *distractors]
    rng.shuffle(options)
    return q, options, truth


# -------------------------------------------------------------------------------------------- rows
def _image_format(rng: random.Random, image: Image.Image) -> str:
    # PNG of a 2000 px textured frame costs ~0.1 s and ~2 MB (16x JPEG), so PNG goes to the smaller frames only.
    return "png" if rng.random() < 0.3 and max(image.size) <= 1280 else "jpeg"


def mc_instruction(question: str, options: list[str]) -> str:
    """MagnifierBench's layout: `"<question> A. <opt>, B. <opt>, C. <opt>, D. <opt>"`."""
    return question + " " + ", ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))


def train_row(
    seed: int, index: int, level: str = "standard", mc_fraction: float = 0.0, mc_prompt: str = ""
) -> dict[str, Any]:
    """Training row `index`. With `mc_fraction`, that share of rows (a fixed per-row draw) asks the benchmark's
    multiple-choice question instead, `mc_prompt` first (the evaluation's prompt), answered with the correct
    option's *text* — an answer the strict parser maps back to its letter and a tiny model can learn."""
    lv = get_level(level)
    rng = random.Random(f"otterhd-synth-train-{seed}-{index}")
    scene = draw_scene(rng, rng.choice(KINDS), *lv.train_long_side, level=lv)
    image = encode(scene.image, _image_format(rng, scene.image))
    if mc_fraction and random.Random(f"otterhd-synth-mc-{seed}-{index}").random() < mc_fraction:
        question, options, truth = _options(rng, scene)
        text = mc_instruction(question, options)
        conversations = [
            {"role": "user", "text": f"{mc_prompt} {text}" if mc_prompt else text},
            {"role": "assistant", "text": truth},
        ]
    else:
        conversations = _conversation(rng, scene)
    return {
        "id": f"syn-{seed}-{index:06d}",
        "image": image,
        "image_id": f"syn-img-{seed}-{index:06d}",
        "conversations": conversations,
        "source": SOURCE,
    }


def scene_example(
    rng: random.Random, level: Level, long_side: tuple[int, int], mc_fraction: float = 0.0, mc_prompt: str = "",
    kind: str | None = None,
) -> tuple[Scene, list[dict[str, str]], tuple[str, list[str], str]]:
    """An unencoded example for in-memory streams (the resolution study): the scene, a training conversation
    (`mc_fraction` of them in the benchmark's MC format, answered with the option text, as in `train_row`) and
    the scene's (question, four options, correct option) for evaluation."""
    scene = draw_scene(rng, kind or rng.choice(KINDS), *long_side, level=level)
    question, options, truth = _options(rng, scene)
    if rng.random() < mc_fraction:
        text = mc_instruction(question, options)
        conversations = [
            {"role": "user", "text": f"{mc_prompt} {text}" if mc_prompt else text},
            {"role": "assistant", "text": truth},
        ]
    else:
        conversations = _conversation(rng, scene)
    return scene, conversations, (question, options, truth)


def bench_row(seed: int, index: int, level: str = "standard") -> dict[str, Any]:
    lv = get_level(level)
    rng = random.Random(f"otterhd-synth-bench-{seed}-{index}")
    scene = draw_scene(rng, KINDS[index % len(KINDS)], *lv.bench_long_side, level=lv)
    q, options, truth = _options(rng, scene)
    instruction = mc_instruction(q, options)
    fmt = _image_format(rng, scene.image)
    item_id = f"mag-{seed}-{index:04d}"
    return {
        "id": item_id,
        "instruction": instruction,
        "answer": "ABCD"[options.index(truth)],
        "images": [
            {"bytes": encode(scene.image, fmt), "path": f"{item_id}.{'png' if fmt == 'png' else 'jpg'}"}
        ],
    }


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height RGB pixels (PIL refuses it before decoding anything)."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def bad_row(seed: int, index: int) -> dict[str, Any]:
    """Row `index` of the bad/odd cycle (see BAD_KINDS); ids `bad-...` must be rejected, `odd-...` must not."""
    kind, must_reject = BAD_KINDS[index % len(BAD_KINDS)]
    rng = random.Random(f"otterhd-synth-bad-{seed}-{index}")
    # Grey-scale variants lose colour, so odd rows ask a colour-free question about the (unique) target shape.
    scene = draw_scene(rng, "position", long_min=400, long_max=900)
    question = f"Where is the small {scene.shape} in the image?"
    answer = f"It is in the {scene.position} of the image."
    conversations: list[dict[str, str]] | None = [
        {"role": "user", "text": question},
        {"role": "assistant", "text": answer},
    ]
    image: bytes | None = encode(scene.image, "jpeg")
    if kind == "truncated_jpeg":
        image = image[: len(image) * 6 // 10]
    elif kind == "random_bytes":
        image = rng.randbytes(4096)
    elif kind == "empty_answer":
        conversations[1]["text"] = ""
    elif kind == "missing_conversations":
        conversations = None
    elif kind == "decompression_bomb":
        image = _bomb_png()
    elif kind == "rgba_png":
        rgba = scene.image.convert("RGBA")
        rgba.putalpha(200)
        image = encode(rgba, "png")
    elif kind == "palette_png":
        image = encode(scene.image.quantize(colors=64), "png")
    elif kind == "png_16bit":
        grey16 = scene.image.convert("L").point(lambda v: v * 257, mode="I").convert("I;16")
        image = encode(grey16, "png")
    elif kind == "empty_image":
        image = b""
    elif kind == "cmyk_jpeg":
        image = encode(scene.image.convert("CMYK"), "jpeg")
    elif kind == "exif_rotated_jpeg":
        # Stored rotated with EXIF orientation 6 ("rotate 90 CW to display"): displayed, it is the scene again.
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        scene.image.transpose(Image.Transpose.ROTATE_90).save(
            buf, format="JPEG", quality=90, exif=exif.tobytes()
        )
        image = buf.getvalue()
    prefix = "bad" if must_reject else "odd"
    return {
        "id": f"{prefix}-{kind}-{index:04d}",
        "image": image,
        "image_id": f"{prefix}-img-{seed}-{index:04d}",
        "conversations": conversations,
        "source": SOURCE,
    }


# ------------------------------------------------------------------------------------ MIMIC-IT export
def _pandas_index_metadata(index: str, columns: list[str]) -> bytes:
    """The `pandas` schema metadata `DataFrame.to_parquet` writes for string columns indexed by `index`."""

    def entry(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "field_name": name,
            "pandas_type": "unicode",
            "numpy_type": "object",
            "metadata": None,
        }

    meta = {
        "index_columns": [index],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            }
        ],
        "columns": [entry(c) for c in columns] + [entry(index)],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    return json.dumps(meta).encode()


def write_mimicit(
    out_dir: str | Path, num_samples: int = 8, seed: int = 7, name: str = "SYN", rows_per_group: int = 64
) -> dict[str, str]:
    """Write a small dataset in the MIMIC-IT/Otter format (the converter's input), from synthetic scenes.

    `{name}_instructions.json` (`meta` + `data` with `rel_ins_ids`: every 4th instruction names the next one),
    `{name}.parquet` (urlsafe `base64` column, indexed by `image_id` the way pandas stores an index) and
    `{name}_train.json` (Otter's train config: id -> related ids). Returns the three paths.
    """
    import base64

    if num_samples <= 0:
        raise ValueError("num_samples must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, dict[str, Any]] = {}
    image_ids, encoded = [], []
    for i in range(num_samples):
        rng = random.Random(f"otterhd-synth-mimicit-{seed}-{i}")
        scene = draw_scene(rng, rng.choice(("colour", "shape", "position")), long_min=400, long_max=1024)
        question, answer = _question(rng, scene, scene.kind)
        ins_id, img_id = f"{name}_INS_{seed}_{i:05d}", f"{name}_IMG_{seed}_{i:05d}"
        related = [f"{name}_INS_{seed}_{i + 1:05d}"] if i % 4 == 0 and i + 1 < num_samples else []
        data[ins_id] = {
            "instruction": question,
            "answer": answer,
            "image_ids": [img_id],
            "rel_ins_ids": related,
        }
        image_ids.append(img_id)
        encoded.append(base64.urlsafe_b64encode(encode(scene.image, "jpeg")).decode())
    paths = {
        "instructions": str(out / f"{name}_instructions.json"),
        "images": str(out / f"{name}.parquet"),
        "train_config": str(out / f"{name}_train.json"),
    }
    meta = {"version": "0.0.1", "time": "synthetic", "author": "otterhd_ray.data.synth"}
    Path(paths["instructions"]).write_text(json.dumps({"meta": meta, "data": data}, indent=1))
    Path(paths["train_config"]).write_text(
        json.dumps({k: v["rel_ins_ids"] for k, v in data.items()}, indent=1)
    )
    schema = pa.schema(
        [("base64", pa.large_string()), ("image_id", pa.large_string())],
        metadata={"pandas": _pandas_index_metadata("image_id", ["base64"])},
    )
    table = pa.table({"base64": encoded, "image_id": image_ids}, schema=schema)
    pq.write_table(table, paths["images"], row_group_size=rows_per_group)
    return paths


# ------------------------------------------------------------------------------------------- driver
def _write_bench(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=BENCH_SCHEMA), tmp, row_group_size=16)
    tmp.replace(path)


def synthesize(
    out_dir: str | Path,
    num_train: int = 256,
    num_bench: int = 32,
    seed: int = 0,
    num_bad: int = 0,
    rows_per_file: int = 64,
    level: str = "standard",
    bench_seed: int | None = None,
    mc_fraction: float = 0.0,
    mc_prompt: str = "",
) -> dict[str, Any]:
    """Write `out_dir/train/shard-*.parquet` and `out_dir/magnifierbench/data/test-00000-of-00001.parquet`.

    Deterministic per seed. Existing synth outputs in `out_dir` are replaced. Returns JSON-friendly stats.
    `level`: scene difficulty (`LEVELS`); `bench_seed` (default `seed`) draws a held-out benchmark from other
    scenes; `mc_fraction` / `mc_prompt`: see `train_row`.
    """
    if num_train < 0 or num_bench < 0 or num_bad < 0:
        raise ValueError("num_train, num_bench and num_bad must be >= 0")
    if not 0.0 <= mc_fraction <= 1.0:
        raise ValueError(f"mc_fraction must be in [0, 1], got {mc_fraction}")
    get_level(level)
    bench_seed = seed if bench_seed is None else bench_seed
    start = time.perf_counter()
    out = Path(out_dir)
    total = num_train + num_bad
    # Spread the bad rows through the shards rather than piling them into the last file.
    bad_at = {int((k + 0.5) * total / num_bad): k for k in range(num_bad)} if num_bad else {}
    kinds: Counter = Counter()
    train_dir = out / "train"
    with ShardWriter(
        train_dir, prefix="shard", rows_per_group=16, rows_per_file=rows_per_file, overwrite=True
    ) as w:
        next_train = 0
        for position in range(total):
            if position in bad_at:
                row = bad_row(seed, bad_at[position])
                kinds[row["id"].split("-")[0]] += 1
            else:
                row = train_row(seed, next_train, level, mc_fraction, mc_prompt)
                next_train += 1
                kinds["ok"] += 1
            w.write(row)
    bench_path = out / BENCH_FILE
    if num_bench:
        _write_bench(bench_path, [bench_row(bench_seed, i, level) for i in range(num_bench)])
    elif bench_path.exists():
        bench_path.unlink()  # a stale benchmark from an earlier run must not pass for this one
    return {
        "out_dir": str(out),
        "train_dir": str(train_dir),
        "train_files": len(w.files),
        "num_train": num_train,
        "num_bad": kinds["bad"],
        "num_odd": kinds["odd"],
        "num_rows": w.num_rows,
        "bench_path": str(bench_path) if num_bench else None,
        "num_bench": num_bench,
        "seed": seed,
        "bench_seed": bench_seed,
        "level": level,
        "seconds": round(time.perf_counter() - start, 2),
    }
