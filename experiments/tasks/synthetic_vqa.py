"""Seeded procedural VQA task on an 8x8 grid of coloured shapes (no downloads).

Every image is a ``grid x grid`` array of cells, every cell holds exactly one object
(a coloured shape) and each cell is exactly one CLIP patch, so a Llava-style model with
``patch_size == cell`` and the "default" feature-select strategy sees exactly
``grid * grid`` (= 64) visual tokens, one per object.

Question types (single-word answers, reported separately; every one picks its cells by position):

``colour_at``  "what colour is at row R column C ?"      -> colour (1 relevant cell), e.g. row c column 5
``shape_at``   "what shape is at row R column C ?"       -> shape  (1 relevant cell)
``left_of``    "what colour is left of row R column C ?" -> colour of the left neighbour (1 relevant cell, not the
               named one: the neighbour's colour is forced to differ from the named cell's, so reading the
               named cell instead is always wrong)
``above``      "what shape is above row R column C ?"    -> shape of the cell above (likewise forced to differ)

Content-picked types (count a colour in a row; "what colour is left of the red circle") were tried and
stayed at chance within the CPU training budget (see models/toy_llava/README.md); position-picked relations
train in minutes once the lookups have taught the model to route.

Rows are letters a..h and columns digits 1..8 in the question text (``ROW_STYLE``), so a question never
contains its answer word (checked in the tests).

``generate(seed, n)`` is deterministic per seed.  ``region`` restricts the *questioned* cells to the
top-left ``region x region`` block (the training curriculum of research/synthetic.md section 7); the
scene itself is always the full, dense grid.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

GRID = 8
CELL = 8  # pixels per cell == CLIP patch size
IMAGE_SIZE = GRID * CELL

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
COLOUR_RGB = np.array(
    [
        [225, 35, 35],
        [40, 185, 60],
        [45, 85, 235],
        [235, 220, 40],
        [155, 55, 205],
        [245, 140, 15],
    ],
    dtype=np.float32,
)
SHAPES = ["square", "circle", "triangle", "cross"]
QTYPES = ["colour_at", "shape_at", "left_of", "above"]
# the answer's cell = the named cell + this (row, column) offset
ANSWER_OFFSET = {"colour_at": (0, 0), "shape_at": (0, 0), "left_of": (0, -1), "above": (-1, 0)}
# what each type asks about, and how the question words the named cell's relation to the answer's cell
ASKED = {"colour_at": ("colour", "at"), "shape_at": ("shape", "at"), "left_of": ("colour", "left of"),
         "above": ("shape", "above")}

# Chance = best guess without the image (the answer distribution is uniform by construction):
CHANCE = {
    "colour_at": 1.0 / len(COLOURS),
    "shape_at": 1.0 / len(SHAPES),
    "left_of": 1.0 / len(COLOURS),
    "above": 1.0 / len(SHAPES),
}

QUESTION_WORDS = ["what", "colour", "shape", "is", "at", "row", "column", "left", "of", "above", "?", "answer", ":"]
DIGITS = [str(i) for i in range(1, GRID + 1)]
ROW_LETTERS = list("abcdefgh")[:GRID]
ANSWER_WORDS = COLOURS + SHAPES
# word-level vocabulary (special tokens are added by the tokenizer); new words are only ever appended
VOCAB = QUESTION_WORDS + DIGITS + ANSWER_WORDS + ROW_LETTERS

# How rows are named in questions: "letters" (row a..h, columns 1..8: row and column arguments are distinct
# tokens, as in chess notation) or "digits" (rows and columns both 1..8).
ROW_STYLE = "letters"


def row_word(r: int, style: str | None = None) -> str:
    return ROW_LETTERS[r] if (style or ROW_STYLE) == "letters" else str(r + 1)


def row_index(word: str) -> int:
    return ROW_LETTERS.index(word) if word in ROW_LETTERS else int(word) - 1


@dataclass
class Scene:
    """A dense grid: ``colours[r, c]`` indexes COLOURS, ``shapes[r, c]`` indexes SHAPES (0-based rows/cols)."""

    colours: np.ndarray
    shapes: np.ndarray
    cell: int = CELL
    jitter: np.ndarray | None = field(default=None, repr=False)  # per-cell RGB jitter (grid, grid, 3)

    @property
    def grid(self) -> int:
        return self.colours.shape[0]

    def colour(self, r: int, c: int) -> str:
        return COLOURS[int(self.colours[r, c])]

    def shape(self, r: int, c: int) -> str:
        return SHAPES[int(self.shapes[r, c])]

    def render(self) -> np.ndarray:
        return render(self)


@dataclass
class Sample:
    image: np.ndarray  # uint8 (H, W, 3)
    question: str
    answer: str
    qtype: str
    scene: Scene
    relevant: list[tuple[int, int]]  # ground-truth relevant cells (0-based row, col); token index = r*grid+c


_BITMAP_CACHE: dict[int, np.ndarray] = {}


def shape_bitmaps(cell: int = CELL) -> np.ndarray:
    """Boolean masks (n_shapes, cell, cell), one per shape, with a 1-pixel margin."""
    if cell in _BITMAP_CACHE:
        return _BITMAP_CACHE[cell]
    m = max(1, cell // 8)
    n = cell - 2 * m
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    u, v = xx / n, yy / n  # in (0, 1)
    square = np.ones((n, n), bool)
    circle = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    triangle = np.abs(u - 0.5) <= 0.5 * v + 1e-6  # apex at the top
    t = max(1, round(n / 3)) / n
    cross = (np.abs(u - 0.5) <= t / 2 + 1e-6) | (np.abs(v - 0.5) <= t / 2 + 1e-6)
    out = np.zeros((len(SHAPES), cell, cell), bool)
    for i, s in enumerate([square, circle, triangle, cross]):
        out[i, m : m + n, m : m + n] = s
    _BITMAP_CACHE[cell] = out
    return out


def render(scene: Scene) -> np.ndarray:
    g, cell = scene.grid, scene.cell
    bm = shape_bitmaps(cell)[scene.shapes]  # (g, g, cell, cell)
    rgb = COLOUR_RGB[scene.colours]  # (g, g, 3)
    if scene.jitter is not None:
        rgb = rgb + scene.jitter
    img = bm[..., None] * rgb[:, :, None, None, :] + (~bm[..., None]) * 20.0  # dark background
    img = img.transpose(0, 2, 1, 3, 4).reshape(g * cell, g * cell, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_scene(rng: np.random.Generator, grid: int, cell: int) -> Scene:
    colours = rng.integers(0, len(COLOURS), (grid, grid))
    shapes = rng.integers(0, len(SHAPES), (grid, grid))
    jitter = rng.uniform(-15, 15, (grid, grid, 3)).astype(np.float32)
    return Scene(colours=colours, shapes=shapes, cell=cell, jitter=jitter)


def _other(rng: np.random.Generator, n: int, exclude: int) -> int:
    v = int(rng.integers(0, n - 1))
    return v + (v >= exclude)


def askable_cells(qtype: str, region: int = GRID, grid: int = GRID) -> np.ndarray:
    """(grid, grid) bool: the cells a ``qtype`` question may name within the questioned ``region``."""
    if qtype not in ANSWER_OFFSET:
        raise ValueError(f"unknown question type {qtype!r}; allowed: {QTYPES}")
    region = max(2, min(region, grid))
    dr, dc = ANSWER_OFFSET[qtype]
    ok = np.zeros((grid, grid), bool)
    ok[-dr:region, -dc:region] = True
    return ok


def make_question(rng: np.random.Generator, scene: Scene, qtype: str, region: int = GRID,
                  row_style: str | None = None, cell_p: np.ndarray | None = None
                  ) -> tuple[str, str, list[tuple[int, int]]]:
    """A question of type ``qtype`` about ``scene`` -> (question, answer, relevant cells).  ``left_of`` and
    ``above`` edit the scene in place so that the neighbour differs from the named cell.

    The named cell is uniform over the askable cells of ``region``, or drawn by ``cell_p`` (probabilities
    over the grid's cells in row-major order, zero where the cell is not askable)."""
    grid = scene.grid
    region = max(2, min(region, grid))
    if qtype not in ANSWER_OFFSET:
        raise ValueError(f"unknown question type {qtype!r}; allowed: {QTYPES}")
    dr, dc = ANSWER_OFFSET[qtype]
    if cell_p is not None:
        r, c = divmod(int(rng.choice(grid * grid, p=cell_p)), grid)
    elif qtype in ("colour_at", "shape_at"):
        r, c = (int(x) for x in rng.integers(0, region, 2))
    elif qtype == "left_of":
        r, c = int(rng.integers(0, region)), int(rng.integers(1, region))
    else:
        r, c = int(rng.integers(1, region)), int(rng.integers(0, region))
    ar, ac = r + dr, c + dc
    what, relation = ASKED[qtype]
    values, n_values = (scene.colours, len(COLOURS)) if what == "colour" else (scene.shapes, len(SHAPES))
    if (ar, ac) != (r, c) and values[ar, ac] == values[r, c]:  # reading the named cell must be wrong
        values[ar, ac] = _other(rng, n_values, int(values[r, c]))
    q = f"what {what} is {relation} row {row_word(r, row_style)} column {c + 1} ?"
    a = scene.colour(ar, ac) if what == "colour" else scene.shape(ar, ac)
    return q, a, [(ar, ac)]


def named_cell(sample: "Sample") -> tuple[int, int]:
    """The cell a question names (its answer's cell minus ``ANSWER_OFFSET``)."""
    (r, c), (dr, dc) = sample.relevant[0], ANSWER_OFFSET[sample.qtype]
    return r - dr, c - dc


def make_sample(rng: np.random.Generator, qtype: str, region: int = GRID, grid: int = GRID, cell: int = CELL,
                row_style: str | None = None) -> Sample:
    scene = _random_scene(rng, grid, cell)
    q, a, rel = make_question(rng, scene, qtype, region, row_style)
    return Sample(image=render(scene), question=q, answer=a, qtype=qtype, scene=scene, relevant=rel)


def type_probabilities(qtypes, weights: list[float] | None) -> np.ndarray | None:
    """Sampling probabilities of ``qtypes`` from ``weights`` (None stays None: uniform)."""
    if weights is None:
        return None
    if len(weights) != len(qtypes) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights {list(weights)} must be one non-negative number per question type "
                         f"{list(qtypes)}, not all zero")
    return np.asarray(weights, float) / sum(weights)


def cell_probabilities(cell_weights: np.ndarray, qtype: str, region: int = GRID) -> np.ndarray:
    """Row-major probabilities of naming each cell from non-negative ``cell_weights`` (grid, grid), restricted to
    the cells ``qtype`` may name in ``region`` (uniform over those when their weights are all zero)."""
    w = np.asarray(cell_weights, float)
    if w.shape != (GRID, GRID) or not np.all(np.isfinite(w)) or w.min() < 0:
        raise ValueError(f"cell weights must be finite, non-negative and of shape {(GRID, GRID)}, got shape {w.shape}")
    ok = askable_cells(qtype, region)
    w = np.where(ok, w, 0.0)
    if w.sum() <= 0:
        w = ok.astype(float)
    return (w / w.sum()).reshape(-1)


def generate_packed(seed: int, n_images: int, per_image: int, region: int = GRID,
                    qtypes: list[str] | tuple[str, ...] = tuple(QTYPES),
                    weights: list[float] | None = None,
                    cell_weights: dict[str, np.ndarray] | None = None) -> list[list[Sample]]:
    """Training data with several questions per image (``per_image``), for packed training. Question types
    are drawn independently, uniformly or by ``weights`` (one per type in ``qtypes``); the named cell of a type
    in ``cell_weights`` is drawn by those (grid, grid) weights (``cell_probabilities``), of the others uniformly.

    The questions' scene edits are applied one after another, so every answer is re-derived from the final
    scene (a later edit may change a cell an earlier question is about)."""
    rng = np.random.default_rng(seed)
    p = type_probabilities(qtypes, weights)
    cell_p = {k: cell_probabilities(w, k, region) for k, w in (cell_weights or {}).items()}
    groups = []
    for _ in range(n_images):
        scene = _random_scene(rng, GRID, CELL)
        made = [(k, make_question(rng, scene, k, region, cell_p=cell_p.get(k)))
                for k in rng.choice(list(qtypes), per_image, p=p)]
        image = render(scene)
        groups.append([Sample(image=image, question=q, answer=answer_from_scene(scene, q), qtype=str(k),
                              scene=scene, relevant=rel) for k, (q, _, rel) in made])
    return groups


def generate(
    seed: int,
    n: int,
    region: int = GRID,
    qtypes: list[str] | tuple[str, ...] = tuple(QTYPES),
    weights: list[float] | None = None,
    grid: int = GRID,
    cell: int = CELL,
    row_style: str | None = None,
) -> list[Sample]:
    """``n`` samples, deterministic in ``seed``.  Question types are drawn by ``weights`` (default uniform);
    when ``weights`` is None the types are balanced exactly (round-robin over a seeded shuffle)."""
    rng = np.random.default_rng(seed)
    qtypes = list(qtypes)
    if weights is None:
        kinds = [qtypes[i % len(qtypes)] for i in range(n)]
        kinds = [kinds[i] for i in rng.permutation(n)]
    else:
        kinds = [qtypes[i] for i in rng.choice(len(qtypes), n, p=type_probabilities(qtypes, weights))]
    return [make_sample(rng, k, region=region, grid=grid, cell=cell, row_style=row_style) for k in kinds]


_RE_AT = re.compile(r"^what (colour|shape) is at row (\w+) column (\d+) \?$")
_RE_LEFT = re.compile(r"^what colour is left of row (\w+) column (\d+) \?$")
_RE_ABOVE = re.compile(r"^what shape is above row (\w+) column (\d+) \?$")


def answer_from_scene(scene: Scene, question: str) -> str:
    """Re-derive the answer from the scene and the question text alone."""
    for pattern, (dr, dc) in ((_RE_AT, ANSWER_OFFSET["colour_at"]), (_RE_LEFT, ANSWER_OFFSET["left_of"]),
                              (_RE_ABOVE, ANSWER_OFFSET["above"])):
        m = pattern.match(question)
        if m:
            *attr, row, col = m.groups()
            r, c = row_index(row) + dr, int(col) - 1 + dc
            if r < 0 or c < 0:
                raise ValueError(f"{question!r}: the named cell has no such neighbour")
            what = attr[0] if attr else ("colour" if pattern is _RE_LEFT else "shape")
            return scene.colour(r, c) if what == "colour" else scene.shape(r, c)
    raise ValueError(f"unparseable question {question!r}")


def qtype_of(question: str) -> str:
    if _RE_AT.match(question):
        return "colour_at" if question.startswith("what colour") else "shape_at"
    if _RE_LEFT.match(question):
        return "left_of"
    if _RE_ABOVE.match(question):
        return "above"
    raise ValueError(question)


def heldout(n: int = 2000, seed: int = 12345) -> list[Sample]:
    """The fixed, seeded held-out evaluation set (full 8x8 region, types balanced)."""
    return generate(seed, n)
