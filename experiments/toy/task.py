"""Seeded procedural scenes and content-named questions for the toy LLaVA (no downloads).

A scene is a 96 x 96 image cut into 12 x 12 CLIP patches of 8 px (144 visual tokens). The background is
textured (a random tint, low-frequency blotches, pixel noise); 11-15 objects sit on a 6 x 6 grid of blocks,
each object a coloured shape covering one block of 2 x 2 patches, so the objects hold 44-60 patches: more
than a third of the image, and most patches of the image are background. Colours and shapes are drawn so
that some colours and some shapes occur exactly once (those are the ones questions may name).

Question types (single-word answers; ``relevant`` lists the patch indices, row-major over 12 x 12, that a
perfect reader needs):

``colour_of``  "what colour is the <shape> ?"              the object of that (unique) shape
``shape_of``   "what shape is the <colour> object ?"       the object of that (unique) colour
``relation``   "what colour is left of the <shape> ?" / "what colour is above the <shape> ?"
               two hops: find the named object, then its neighbour in the adjacent block (whose colour
               differs from the named one's, so reading the named object is wrong); relevant = both
``count``      "how many <colour> objects ?"              one .. four; relevant = every object of that colour
``exists``     "is there any <colour> <shape> ?"           yes / no (POPE-like; a "no" always names a colour
               and a shape that are both present, on other objects); relevant = the objects of that colour
``position``   "what colour is at row <r> column <c> ?"    the text-agnostic control: names a block by place

Block rows are letters a..f and block columns digits 1..6. A question never contains its answer word
(tested). ``answer_from_scene`` re-derives every answer from the scene and the question text alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

PATCH = 8  # pixels per CLIP patch
GRID = 12  # patches per side: 144 visual tokens
BLOCK = 2  # an object covers BLOCK x BLOCK patches
BLOCKS = GRID // BLOCK  # 6 x 6 object slots
IMAGE_SIZE = GRID * PATCH
N_OBJECTS = (11, 15)  # inclusive range of objects per scene

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]
COLOUR_RGB = np.array(
    [[225, 35, 35], [40, 185, 60], [40, 80, 240], [240, 225, 40], [160, 50, 210], [250, 140, 20], [40, 225, 230]],
    dtype=np.float32,
)
SHAPES = ["square", "circle", "triangle", "cross", "diamond", "ring"]
NUMBERS = ["one", "two", "three", "four"]
YES_NO = ["yes", "no"]
ROWS = list("abcdef")
COLS = [str(i) for i in range(1, BLOCKS + 1)]
QTYPES = ["colour_of", "shape_of", "relation", "count", "exists", "position"]
RELATIONS = {"left of": (0, -1), "above": (-1, 0)}  # block offset of the answer from the named object

ANSWER_WORDS = COLOURS + SHAPES + NUMBERS + YES_NO
QUESTION_WORDS = [
    "what",
    "colour",
    "shape",
    "is",
    "the",
    "object",
    "objects",
    "left",
    "of",
    "above",
    "how",
    "many",
    "there",
    "any",
    "at",
    "row",
    "column",
    "?",
    "answer",
    ":",
    "describe",
    ",",
]
# word-level vocabulary (special tokens are added by the tokenizer)
VOCAB = QUESTION_WORDS + ANSWER_WORDS + ROWS + COLS


@dataclass
class Scene:
    """Objects on the BLOCKS x BLOCKS grid: ``blocks[i] = (row, col)``, ``colours[i]``, ``shapes[i]``."""

    blocks: np.ndarray  # (n, 2) int
    colours: np.ndarray  # (n,) int into COLOURS
    shapes: np.ndarray  # (n,) int into SHAPES
    texture_seed: int = 0
    jitter: np.ndarray | None = field(default=None, repr=False)  # (n, 3) colour jitter

    def at(self, row: int, col: int) -> int | None:
        """Index of the object in block (row, col), or None."""
        hit = np.flatnonzero((self.blocks[:, 0] == row) & (self.blocks[:, 1] == col))
        return int(hit[0]) if len(hit) else None

    def patches(self, i: int) -> list[int]:
        """The BLOCK x BLOCK patch indices (row-major over GRID x GRID) object ``i`` covers."""
        r, c = (int(x) * BLOCK for x in self.blocks[i])
        return [(r + dr) * GRID + c + dc for dr in range(BLOCK) for dc in range(BLOCK)]

    def render(self) -> np.ndarray:
        return render(self)


@dataclass
class Sample:
    image: np.ndarray  # uint8 (H, W, 3)
    question: str
    answer: str
    qtype: str
    scene: Scene = field(repr=False)
    relevant: list[int] = field(default_factory=list)  # patch indices a perfect reader needs


# ------------------------------------------------------------------------------------------ rendering
_BITMAPS: np.ndarray | None = None


def shape_bitmaps() -> np.ndarray:
    """Boolean masks (n_shapes, 16, 16) with a 1-pixel margin, one per shape."""
    global _BITMAPS
    if _BITMAPS is None:
        size, n = BLOCK * PATCH, BLOCK * PATCH - 2
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
        u, v = xx / n - 0.5, yy / n - 0.5  # in (-0.5, 0.5)
        r2 = u**2 + v**2
        masks = [
            (np.abs(u) <= 0.42) & (np.abs(v) <= 0.42),  # square
            r2 <= 0.25,  # circle
            np.abs(u) <= 0.5 * (v + 0.5) + 1e-6,  # triangle, apex up
            (np.abs(u) <= 0.15) | (np.abs(v) <= 0.15),  # cross
            np.abs(u) + np.abs(v) <= 0.5,  # diamond
            (r2 <= 0.25) & (r2 >= 0.07),  # ring
        ]
        out = np.zeros((len(SHAPES), size, size), bool)
        for i, m in enumerate(masks):
            out[i, 1 : 1 + n, 1 : 1 + n] = m
        _BITMAPS = out
    return _BITMAPS


def background(seed: int) -> np.ndarray:
    """A textured background (IMAGE_SIZE, IMAGE_SIZE, 3) float: tint + low-frequency blotches + noise."""
    rng = np.random.default_rng(seed)
    tint = rng.uniform(70, 150) + rng.uniform(-15, 15, 3)
    coarse = rng.normal(0, 18, (BLOCKS + 1, BLOCKS + 1, 1))
    # bilinear upsampling of the coarse blotches to the image size
    t = np.linspace(0, BLOCKS, IMAGE_SIZE)
    i0 = np.minimum(t.astype(int), BLOCKS - 1)
    f = (t - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]
    blot = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
    return tint + blot + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 3))


def render(scene: Scene) -> np.ndarray:
    img = background(scene.texture_seed)
    bm = shape_bitmaps()
    size = BLOCK * PATCH
    for i, (r, c) in enumerate(scene.blocks):
        rgb = COLOUR_RGB[scene.colours[i]] + (0 if scene.jitter is None else scene.jitter[i])
        tile = img[r * size : (r + 1) * size, c * size : (c + 1) * size]
        m = bm[scene.shapes[i]]
        tile[m] = rgb
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ scenes
def _counts(rng: np.random.Generator, n: int, k: int, max_count: int) -> np.ndarray:
    """How often each of ``k`` values occurs among ``n`` objects: at least two values exactly once and
    none more than ``max_count`` times (rejection sampling from a random multinomial)."""
    while True:
        c = rng.multinomial(n, rng.dirichlet(np.full(k, 1.5)))
        if (c == 1).sum() >= 2 and c.max() <= max_count:
            return c


def random_scene(rng: np.random.Generator, n_objects: tuple[int, int] = N_OBJECTS) -> Scene:
    """A scene with ``n_objects`` (an inclusive range) objects; training's curriculum starts with fewer."""
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    slots = rng.choice(BLOCKS * BLOCKS, n, replace=False)
    blocks = np.stack([slots // BLOCKS, slots % BLOCKS], 1)
    colours = rng.permutation(np.repeat(np.arange(len(COLOURS)), _counts(rng, n, len(COLOURS), len(NUMBERS))))
    shapes = rng.permutation(np.repeat(np.arange(len(SHAPES)), _counts(rng, n, len(SHAPES), 5)))
    return Scene(
        blocks=blocks,
        colours=colours,
        shapes=shapes,
        texture_seed=int(rng.integers(2**31)),
        jitter=rng.uniform(-15, 15, (n, 3)).astype(np.float32),
    )


def _unique(values: np.ndarray, k: int) -> list[int]:
    return [v for v in range(k) if (values == v).sum() == 1]


# ------------------------------------------------------------------------------------------ questions
def candidates(scene: Scene, qtype: str) -> list[tuple[str, str, list[int]]]:
    """Every well-posed question of ``qtype`` about ``scene`` as (question, answer, relevant patches)."""
    out = []
    if qtype == "colour_of":
        for s in _unique(scene.shapes, len(SHAPES)):
            i = int(np.flatnonzero(scene.shapes == s)[0])
            out.append((f"what colour is the {SHAPES[s]} ?", COLOURS[scene.colours[i]], scene.patches(i)))
    elif qtype == "shape_of":
        for c in _unique(scene.colours, len(COLOURS)):
            i = int(np.flatnonzero(scene.colours == c)[0])
            out.append((f"what shape is the {COLOURS[c]} object ?", SHAPES[scene.shapes[i]], scene.patches(i)))
    elif qtype == "relation":
        for s in _unique(scene.shapes, len(SHAPES)):
            i = int(np.flatnonzero(scene.shapes == s)[0])
            for rel, (dr, dc) in RELATIONS.items():
                j = scene.at(int(scene.blocks[i, 0]) + dr, int(scene.blocks[i, 1]) + dc)
                if j is not None and scene.colours[j] != scene.colours[i]:
                    out.append(
                        (
                            f"what colour is {rel} the {SHAPES[s]} ?",
                            COLOURS[scene.colours[j]],
                            sorted(scene.patches(i) + scene.patches(j)),
                        )
                    )
    elif qtype == "count":
        for c in range(len(COLOURS)):
            idx = np.flatnonzero(scene.colours == c)
            if 1 <= len(idx) <= len(NUMBERS):
                out.append(
                    (
                        f"how many {COLOURS[c]} objects ?",
                        NUMBERS[len(idx) - 1],
                        sorted(p for i in idx for p in scene.patches(int(i))),
                    )
                )
    elif qtype == "exists":
        present = {(int(c), int(s)) for c, s in zip(scene.colours, scene.shapes)}
        for c in sorted(set(scene.colours.tolist())):
            for s in sorted(set(scene.shapes.tolist())):
                idx = np.flatnonzero(scene.colours == c)  # the objects whose shape decides the answer
                out.append(
                    (
                        f"is there any {COLOURS[c]} {SHAPES[s]} ?",
                        "yes" if (c, s) in present else "no",
                        sorted(p for i in idx for p in scene.patches(int(i))),
                    )
                )
    elif qtype == "position":
        for i, (r, c) in enumerate(scene.blocks):
            out.append(
                (f"what colour is at row {ROWS[r]} column {COLS[c]} ?", COLOURS[scene.colours[i]], scene.patches(i))
            )
    else:
        raise ValueError(f"unknown question type {qtype!r}; allowed: {QTYPES}")
    return out


def pick(rng: np.random.Generator, scene: Scene, qtype: str) -> tuple[str, str, list[int]] | None:
    """One question of ``qtype`` about ``scene`` (None when the scene has none). ``exists`` draws yes and
    no with equal probability; ``count`` draws the answer uniformly among those the scene offers."""
    cands = candidates(scene, qtype)
    if not cands:
        return None
    if qtype in ("exists", "count"):
        answers = sorted({a for _, a, _ in cands})
        want = answers[int(rng.integers(len(answers)))]
        cands = [q for q in cands if q[1] == want]
    return cands[int(rng.integers(len(cands)))]


def caption(scene: Scene) -> str:
    """The alignment caption: every object as "<colour> <shape> <row> <column>", in raster order."""
    order = np.lexsort((scene.blocks[:, 1], scene.blocks[:, 0]))
    return " , ".join(
        f"{COLOURS[scene.colours[i]]} {SHAPES[scene.shapes[i]]} {ROWS[scene.blocks[i, 0]]} {COLS[scene.blocks[i, 1]]}"
        for i in order
    )


def make_sample(rng: np.random.Generator, qtype: str) -> Sample:
    while True:
        scene = random_scene(rng)
        q = pick(rng, scene, qtype)
        if q is not None:
            return Sample(image=render(scene), question=q[0], answer=q[1], qtype=qtype, scene=scene, relevant=q[2])


def generate(seed: int, n: int, qtypes: list[str] | tuple[str, ...] = tuple(QTYPES)) -> list[Sample]:
    """``n`` samples with exactly balanced question types (a seeded shuffle), deterministic in ``seed``."""
    bad = sorted(set(qtypes) - set(QTYPES))
    if bad or not qtypes:
        raise ValueError(f"unknown question type(s) {bad or list(qtypes)}; allowed: {QTYPES}")
    rng = np.random.default_rng(seed)
    kinds = [list(qtypes)[i % len(qtypes)] for i in range(n)]
    return [make_sample(rng, kinds[i]) for i in rng.permutation(n)]


def heldout(n: int = 2000, seed: int = 12345, qtypes=tuple(QTYPES)) -> list[Sample]:
    """The fixed, seeded held-out evaluation set."""
    return generate(seed, n, qtypes)


def chance(samples) -> float:
    """Accuracy of the best image-free guess (each type's most frequent answer), averaged over the types."""
    by_type: dict[str, list[str]] = {}
    for s in samples:
        by_type.setdefault(s.qtype, []).append(s.answer)
    return float(np.mean([max(a.count(x) for x in set(a)) / len(a) for a in by_type.values()]))


# ------------------------------------------------------------------------------------------ answers
_PATTERNS = [
    ("colour_of", re.compile(r"^what colour is the (\w+) \?$")),
    ("shape_of", re.compile(r"^what shape is the (\w+) object \?$")),
    ("relation", re.compile(r"^what colour is (left of|above) the (\w+) \?$")),
    ("count", re.compile(r"^how many (\w+) objects \?$")),
    ("exists", re.compile(r"^is there any (\w+) (\w+) \?$")),
    ("position", re.compile(r"^what colour is at row (\w) column (\d) \?$")),
]


def qtype_of(question: str) -> str:
    for kind, pattern in _PATTERNS:
        if pattern.match(question):
            return kind
    raise ValueError(f"unparseable question {question!r}")


def answer_from_scene(scene: Scene, question: str) -> str:
    """Re-derive the answer from the scene and the question text alone (independent of ``candidates``)."""
    for kind, pattern in _PATTERNS:
        m = pattern.match(question)
        if not m:
            continue
        g = m.groups()
        if kind == "colour_of":
            (i,) = np.flatnonzero(scene.shapes == SHAPES.index(g[0]))
            return COLOURS[scene.colours[i]]
        if kind == "shape_of":
            (i,) = np.flatnonzero(scene.colours == COLOURS.index(g[0]))
            return SHAPES[scene.shapes[i]]
        if kind == "relation":
            (i,) = np.flatnonzero(scene.shapes == SHAPES.index(g[1]))
            dr, dc = RELATIONS[g[0]]
            j = scene.at(int(scene.blocks[i, 0]) + dr, int(scene.blocks[i, 1]) + dc)
            return COLOURS[scene.colours[j]]
        if kind == "count":
            return NUMBERS[int((scene.colours == COLOURS.index(g[0])).sum()) - 1]
        if kind == "exists":
            hit = (scene.colours == COLOURS.index(g[0])) & (scene.shapes == SHAPES.index(g[1]))
            return "yes" if hit.any() else "no"
        j = scene.at(ROWS.index(g[0]), COLS.index(g[1]))
        return COLOURS[scene.colours[j]]
    raise ValueError(f"unparseable question {question!r}")
