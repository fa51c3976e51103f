"""A seeded synthetic visual question task with ground-truth relevant patches.

Images are 64x64: one to three coloured shapes (circle, square, triangle) on a cluttered background
(a greyish tone with pixel noise, faint lines and dots). Questions ask for the colour, the shape, the count, the presence or the
position (column) of a named object; answers are one word. For every question the patches (8x8)
covered by the objects it asks about are known, so a pruning recipe's kept tokens can be scored by how
many of the relevant ones survive. The answers are balanced so that without the image a model can
only guess: accuracy on blank images falls to chance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 8 x 8 = 64 visual tokens
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
COLUMNS = ("left", "middle", "right")
COUNTS = ("one", "two", "three")
KINDS = ("color", "shape", "count", "presence", "position")
ANSWERS = {
    "color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "presence": ("yes", "no"), "position": COLUMNS,
}
VOCAB = (
    ["<pad>", "<s>", "</s>", "<unk>", "<image>", "?"]
    + "what color is the shape object how many objects are there a where describe".split()
    + list(COLORS) + list(SHAPES) + list(COLUMNS) + list(COUNTS) + ["yes", "no"]
)


@dataclass
class Shape:
    kind: str
    color: str
    column: int  # 0, 1, 2
    row: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass
class Question:
    """One image, one question, its one-word answer and the patches relevant to it."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    relevant: list[int] = field(default_factory=list)  # patch indices (row-major, 0..63)
    shapes: list[Shape] = field(default_factory=list)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(shape.box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _patches(box: tuple[int, int, int, int]) -> list[int]:
    x0, y0, x1, y1 = box
    cols = range(max(0, x0 // PATCH), min(GRID - 1, x1 // PATCH) + 1)
    rows = range(max(0, y0 // PATCH), min(GRID - 1, y1 // PATCH) + 1)
    return [r * GRID + c for r in rows for c in cols]


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
        for _ in range(rng.randint(4, 8)):  # clutter: faint lines and dots
            tone = tuple(rng.randint(60, 160) for _ in range(3))
            if rng.random() < 0.5:
                draw.line([rng.randrange(64), rng.randrange(64), rng.randrange(64), rng.randrange(64)], fill=tone)
            else:
                x, y = rng.randrange(62), rng.randrange(62)
                draw.rectangle([x, y, x + 1, y + 1], fill=tone)
        cells = rng.sample([(c, r) for c in range(3) for r in range(3)], rng.randint(1, 3))
        shapes = []
        for column, row in cells:
            size = rng.randint(14, 18)
            cx = 11 + 21 * column + rng.randint(-2, 2)
            cy = 11 + 21 * row + rng.randint(-2, 2)
            box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
            shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), column, row, box))
        for shape in shapes:
            _draw_shape(draw, shape)
        return image, shapes

    def question(self, kind: str | None = None) -> Question:
        """One question of ``kind`` (random kind by default) with a uniformly drawn answer."""
        kind = kind or self.rng.choice(KINDS)
        target = self.rng.choice(ANSWERS[kind])
        for _ in range(200):  # redraw scenes until one has the drawn answer
            image, shapes = self._scene()
            made = self._ask(kind, target, shapes)
            if made is not None:
                text, relevant = made
                return Question(image, text, target, kind, sorted(set(relevant)), shapes)
        raise RuntimeError(f"could not make a {kind!r} question answered {target!r}")

    def _ask(self, kind: str, target: str, shapes: list[Shape]) -> tuple[str, list[int]] | None:
        rng = self.rng
        if kind == "count":
            if COUNTS.index(target) + 1 != len(shapes):
                return None
            return "how many objects are there ?", [p for s in shapes for p in _patches(s.box)]
        if kind == "presence":
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            matching = [s for s in shapes if s.color == color and s.kind == shape]
            if (target == "yes") != bool(matching):
                return None
            return f"is there a {color} {shape} ?", [p for s in matching for p in _patches(s.box)]
        if kind == "color":
            by_kind = [s for s in shapes if [t.kind for t in shapes].count(s.kind) == 1 and s.color == target]
            if not by_kind:
                return None
            s = by_kind[0]
            return f"what color is the {s.kind} ?", _patches(s.box)
        if kind == "shape":
            unique = [s for s in shapes if [t.color for t in shapes].count(s.color) == 1 and s.kind == target]
            if not unique:
                return None
            s = unique[0]
            return f"what shape is the {s.color} object ?", _patches(s.box)
        # position: a uniquely described object in the target column
        unique = [s for s in shapes if sum(t.kind == s.kind and t.color == s.color for t in shapes) == 1
                  and COLUMNS[s.column] == target]
        if not unique:
            return None
        s = unique[0]
        return f"where is the {s.color} {s.kind} ?", _patches(s.box)

    def questions(self, n: int) -> list[Question]:
        return [self.question() for _ in range(n)]


def description(shapes: list[Shape]) -> str:
    """``color shape column`` for every object, left to right then top to bottom (a training task only)."""
    ordered = sorted(shapes, key=lambda s: (s.column, s.row))
    return " ".join(f"{s.color} {s.kind} {COLUMNS[s.column]}" for s in ordered)


def patch_labels(shapes: list[Shape]) -> np.ndarray:
    """What covers most of each 8x8 patch: 0 for background, else 1 + colour * 3 + shape. ``[64]`` int.

    Used only while training (a dense auxiliary target that teaches the vision tower quickly).
    """
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        label = 1 + list(COLORS).index(shape.color) * len(SHAPES) + SHAPES.index(shape.kind)
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=label)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=label)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=label)
    grid = np.asarray(canvas).reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    counts = np.stack([(grid == k).sum(axis=1) for k in range(1 + len(COLORS) * len(SHAPES))], axis=1)
    counts[:, 0] = np.where(counts[:, 1:].max(axis=1) >= PATCH * PATCH // 4, 0, counts[:, 0])
    return counts.argmax(axis=1)


def prompt(question: str) -> str:
    """The text the model sees: the question, the image, the question again; then it answers.

    The question before the image lets every image token know what is asked (a small model
    trained for minutes needs that); the question after it is the instruction the answer follows,
    as in LLaVA's template, and what instruction-guided criteria read.
    """
    return f"<s> {question} <image> {question}"
