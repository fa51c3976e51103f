"""A seeded synthetic visual question task with ground-truth relevant patches, laid out like LLaVA-1.5.

Images are 96x96 (a 12x12 grid of 8-pixel patches: 144 visual tokens). A scene holds four to eight
coloured shapes (circle, square, triangle; red, green, blue, yellow) laid on the patch grid: a small
one inside one patch, a big one inside a 2x2 block of patches, one empty patch at least between two
objects, on a cluttered background; distractors share the asked object's colour or shape. Each
patch thus shows its own part of one object, as a real image's patch shows a part of a scene.
Questions (``KINDS``, the mix the toy is trained and evaluated on) ask for

- ``color``: the colour of an object named by its size and shape,
- ``shape``: the shape of an object named by its size and colour,
- ``presence``: whether an object of a colour and shape is there;

``question(kind)`` also asks (``ALL_KINDS``)

- ``count``: how many objects of one colour there are,
- ``relation``: where one object is relative to another (left, right, above, below).

Answers are one word, drawn uniformly per kind, so without the image a model can only guess. Every
question knows the patches that hold its evidence (``relevant``): the asked objects' patches; for a
presence question answered "no", the objects that share the asked colour or shape. An oracle
criterion (`prunekit.toy.oracle`) keeps those first.

The prompt is LLaVA-1.5's chat layout, image first: ``USER: <image>\\n{question} ASSISTANT:``. Image
tokens never see the question (causal attention); the question reads the image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 12 x 12 = 144 visual tokens
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
COUNTS = ("one", "two", "three")
RELATIONS = ("left", "right", "above", "below")
ALL_KINDS = ("color", "shape", "count", "presence", "relation")
KINDS = ("color", "shape", "presence")  # the questions the toy is trained and evaluated on (docs/toy.md: why)
ANSWERS = {
    "color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "presence": ("yes", "no"), "relation": RELATIONS,
}
N_PATCH_CLASSES = 1 + len(SIZES) * len(COLORS) * len(SHAPES)  # background, or one size-colour-shape triple
CHANCE = sum(1 / len(ANSWERS[k]) for k in KINDS) / len(KINDS)  # accuracy of a blind uniform guess
VOCAB = (
    ["<pad>", "<s>", "</s>", "<unk>", "<image>", "?", "USER:", "ASSISTANT:"]
    + "what color is the shape object how many objects are there a where describe relative to".split()
    + list(COLORS) + list(SHAPES) + list(SIZES) + list(COUNTS) + list(RELATIONS) + ["yes", "no"]
)


@dataclass
class Shape:
    kind: str
    color: str
    size: str  # "small" or "big"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass
class Question:
    """One image, one question, its one-word answer and the patches relevant to it."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    relevant: list[int] = field(default_factory=list)  # patch indices (row-major, 0..GRID*GRID-1)
    shapes: list[Shape] = field(default_factory=list)


class Turn(NamedTuple):
    """A later question on a question's scene: its text, answer and relevant patches."""

    question: str
    answer: str
    relevant: list[int]


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x0, y0, x1, y1 = shape.box
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(shape.box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def shape_patches(shape: Shape) -> list[int]:
    """The patches the shape really covers (at least one pixel of it), row-major."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, 1)
    covered = np.asarray(canvas).reshape(GRID, PATCH, GRID, PATCH).any(axis=(1, 3))  # [GRID, GRID]
    return np.flatnonzero(covered).tolist()


class ToyTask:
    """Generates questions from a seed; the same seed gives the same questions."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def _scene(self) -> tuple[Image.Image, list[Shape]]:
        rng = self.rng
        base = np.array([rng.randint(90, 130) for _ in range(3)])  # a greyish background of its own
        noise = np.random.default_rng(rng.randrange(2**32)).integers(-12, 13, (IMAGE_SIZE, IMAGE_SIZE, 3))
        image = Image.fromarray((base + noise).clip(0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(6, 12)):  # clutter: faint lines and dots
            tone = tuple(rng.randint(60, 160) for _ in range(3))
            if rng.random() < 0.5:
                draw.line([rng.randrange(IMAGE_SIZE) for _ in range(4)], fill=tone)
            else:
                x, y = rng.randrange(IMAGE_SIZE - 2), rng.randrange(IMAGE_SIZE - 2)
                draw.rectangle([x, y, x + 1, y + 1], fill=tone)
        shapes: list[Shape] = []
        taken = np.zeros((GRID + 2, GRID + 2), dtype=bool)  # occupied patches, padded by one on every side
        for _ in range(rng.randint(4, 8)):
            for _attempt in range(50):  # a free block of patches, one empty patch at least from the others
                size_name = rng.choice(SIZES)
                cells = 1 if size_name == "small" else 2  # patches per side
                row, column = rng.randrange(GRID - cells + 1), rng.randrange(GRID - cells + 1)
                if taken[row:row + cells + 2, column:column + cells + 2].any():
                    continue
                taken[row + 1:row + cells + 1, column + 1:column + cells + 1] = True
                side = rng.randint(5, 7) if size_name == "small" else rng.randint(12, 15)  # pixels
                x0 = column * PATCH + rng.randint(0, cells * PATCH - side)
                y0 = row * PATCH + rng.randint(0, cells * PATCH - side)
                box = (x0, y0, x0 + side - 1, y0 + side - 1)
                shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), size_name, box))
                break
        for shape in shapes:
            draw_shape(draw, shape, COLORS[shape.color])
        return image, shapes

    def question(self, kind: str | None = None) -> Question:
        """One question of ``kind`` (random kind by default) with a uniformly drawn answer."""
        if kind is not None and kind not in ALL_KINDS:
            raise ValueError(f"unknown question kind {kind!r}; valid: {', '.join(ALL_KINDS)}")
        kind = kind or self.rng.choice(KINDS)
        target = self.rng.choice(ANSWERS[kind])
        for _ in range(500):  # redraw scenes until one has the drawn answer
            image, shapes = self._scene()
            made = self._ask(kind, target, shapes)
            if made is not None:
                text, evidence = made
                relevant = sorted({p for s in evidence for p in shape_patches(s)})
                return Question(image, text, target, kind, relevant, shapes)
        raise RuntimeError(f"could not make a {kind!r} question answered {target!r}")

    def _ask(self, kind: str, target: str, shapes: list[Shape]) -> tuple[str, list[Shape]] | None:
        """The question text and the objects that hold its evidence, or None when this scene cannot ask it."""
        rng = self.rng
        if kind == "count":
            color = rng.choice(list(COLORS))
            matching = [s for s in shapes if s.color == color]
            if len(matching) != COUNTS.index(target) + 1:
                return None
            return f"how many {color} objects are there ?", matching
        if kind == "presence":
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            matching = [s for s in shapes if s.color == color and s.kind == shape]
            if (target == "yes") != bool(matching):
                return None
            if matching:
                return f"is there a {color} {shape} ?", matching
            alike = [s for s in shapes if s.color == color or s.kind == shape]
            return (f"is there a {color} {shape} ?", alike) if alike else None  # a near miss, not an empty scene
        if kind == "color":  # named by size and shape; at least one distractor of the same shape or colour
            named = [s for s in shapes if s.color == target
                     and sum(t.size == s.size and t.kind == s.kind for t in shapes) == 1
                     and any(t is not s and (t.kind == s.kind or t.color == s.color) for t in shapes)]
            if not named:
                return None
            s = rng.choice(named)
            return f"what color is the {s.size} {s.kind} ?", [s]
        if kind == "shape":
            named = [s for s in shapes if s.kind == target
                     and sum(t.size == s.size and t.color == s.color for t in shapes) == 1
                     and any(t is not s and (t.kind == s.kind or t.color == s.color) for t in shapes)]
            if not named:
                return None
            s = rng.choice(named)
            return f"what shape is the {s.size} {s.color} object ?", [s]
        # relation: where is A relative to B; both named uniquely by colour and shape, one axis clearly dominant
        unique = [s for s in shapes if sum(t.color == s.color and t.kind == s.kind for t in shapes) == 1]
        pairs = [(a, b) for a in unique for b in unique if a is not b and _relation(a, b) == target]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return f"where is the {a.name()} relative to the {b.name()} ?", [a, b]

    def questions(self, n: int) -> list[Question]:
        return [self.question() for _ in range(n)]

    def follow_ups(self, question: Question, n: int) -> list[Turn]:
        """Up to ``n`` more turns (question, answer, relevant patches) on ``question``'s scene, each asked once:
        the later turns of a training conversation (answers are not uniform here, the first question's is)."""
        turns: list[Turn] = []
        asked = {question.question}
        for _ in range(8 * n):
            if len(turns) == n:
                break
            kind = self.rng.choice(KINDS)
            target = self.rng.choice(ANSWERS[kind])
            made = self._ask(kind, target, question.shapes)
            if made is not None and made[0] not in asked:
                asked.add(made[0])
                turns.append(Turn(made[0], target, sorted({p for s in made[1] for p in shape_patches(s)})))
        return turns


def _relation(a: Shape, b: Shape) -> str | None:
    """Where ``a`` lies relative to ``b`` along the clearly dominant axis (twice the other), else None."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= 6:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= 6:
        return "above" if dy < 0 else "below"
    return None


def description(shapes: list[Shape]) -> str:
    """``size color shape`` for every object, top to bottom by patch row, then left to right (training only)."""
    ordered = sorted(shapes, key=lambda s: (int(s.center[1]) // PATCH, s.center[0]))
    return " ".join(f"{s.size} {s.color} {s.kind}" for s in ordered)


def patch_labels(shapes: list[Shape]) -> tuple[np.ndarray, np.ndarray]:
    """Dense per-patch targets (training only: they teach the vision tower quickly).

    Returns ``labels`` (``[GRID*GRID]`` int): what covers most of each patch, 0 for background, else
    1 + an index over (size, colour, shape); a patch a shape covers with 6 pixels or more counts as
    that shape's. And ``centers`` (``[GRID*GRID]`` bool): the patch holding each object's centre.
    """
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    centers = np.zeros(GRID * GRID, dtype=bool)
    for shape in shapes:
        label = 1 + (SIZES.index(shape.size) * len(COLORS) + list(COLORS).index(shape.color)) * len(SHAPES)
        draw_shape(draw, shape, label + SHAPES.index(shape.kind))
        x, y = shape.center
        centers[int(y) // PATCH * GRID + int(x) // PATCH] = True
    grid = np.asarray(canvas).reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    counts = np.stack([(grid == k).sum(axis=1) for k in range(N_PATCH_CLASSES)], axis=1)
    counts[:, 0] = np.where(counts[:, 1:].max(axis=1) >= 6, 0, counts[:, 0])
    return counts.argmax(axis=1), centers


def prompt(question: str) -> str:
    """The text the model sees: LLaVA-1.5's chat layout, image first, then the question, then the answer.

    ``<s>`` is written out (the word-level tokenizer adds no special tokens); batches are padded on
    the left so that every prompt ends where the answer starts.
    """
    return f"<s> USER: <image>\n{question} ASSISTANT:"
