"""The synthetic grid VQA generator: deterministic, correct by construction, no answer leaks."""
import numpy as np
import pytest

from experiments.tasks import synthetic_vqa as task


def test_deterministic_per_seed():
    a, b, c = task.generate(3, 50), task.generate(3, 50), task.generate(4, 50)
    assert [(s.question, s.answer, s.qtype) for s in a] == [(s.question, s.answer, s.qtype) for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [(s.question, s.answer) for s in a] != [(s.question, s.answer) for s in c]


def test_images_dense_grid_and_shapes():
    s = task.generate(0, 8)
    for x in s:
        assert x.image.dtype == np.uint8 and x.image.shape == (task.IMAGE_SIZE, task.IMAGE_SIZE, 3)
        assert x.scene.colours.shape == (task.GRID, task.GRID) and x.scene.shapes.shape == (task.GRID, task.GRID)
        assert np.array_equal(x.image, x.scene.render())
    # every cell holds a shape: each CELL x CELL patch has coloured (non-background) pixels
    cells = s[0].image.reshape(task.GRID, task.CELL, task.GRID, task.CELL, 3).max(axis=(1, 3, 4))
    assert (cells > 100).all()
    # the four shape bitmaps are distinct
    bm = task.shape_bitmaps(task.CELL).reshape(len(task.SHAPES), -1)
    assert len({tuple(r) for r in bm}) == len(task.SHAPES)


def test_answers_correct_by_construction():
    samples = task.generate(11, 500)
    assert {s.qtype for s in samples} == set(task.QTYPES)
    for s in samples:
        assert task.answer_from_scene(s.scene, s.question) == s.answer
        assert task.qtype_of(s.question) == s.qtype
        assert s.answer in task.ANSWER_WORDS


def test_questions_never_contain_answer():
    for s in task.generate(12, 2000):
        assert s.answer not in s.question.split()
        assert all(w in task.VOCAB for w in s.question.split())


def test_balanced_types_and_chance():
    samples = task.heldout(2000)
    counts = {k: sum(s.qtype == k for s in samples) for k in task.QTYPES}
    assert all(v == 500 for v in counts.values())
    assert set(task.CHANCE) == set(task.QTYPES)
    # answers are (near) uniform, so CHANCE is the best image-blind accuracy
    for k in task.QTYPES:
        ans = [s.answer for s in samples if s.qtype == k]
        top = max(ans.count(a) for a in set(ans)) / len(ans)
        assert top < task.CHANCE[k] + 0.08


def test_region_curriculum_restricts_questioned_cells():
    for s in task.generate(5, 300, region=4):
        assert all(r < 4 and c < 4 for r, c in s.relevant)


@pytest.mark.parametrize("qtype", task.QTYPES)
def test_relevant_cells_determine_answer(qtype):
    """Changing a cell that is not relevant never changes the answer."""
    rng = np.random.default_rng(0)
    for s in task.generate(7, 60, qtypes=[qtype]):
        sc = s.scene
        irrelevant = [(r, c) for r in range(task.GRID) for c in range(task.GRID) if (r, c) not in s.relevant]
        r, c = irrelevant[rng.integers(len(irrelevant))]
        col0, shp0 = sc.colours[r, c], sc.shapes[r, c]
        for col in range(len(task.COLOURS)):
            for shp in range(len(task.SHAPES)):
                sc.colours[r, c], sc.shapes[r, c] = col, shp
                assert task.answer_from_scene(sc, s.question) == s.answer
        sc.colours[r, c], sc.shapes[r, c] = col0, shp0


def test_packed_groups_share_the_image_and_answers_are_correct():
    groups = task.generate_packed(7, 20, 8)
    assert sum(map(len, groups)) == 20 * 8  # every question stays well posed
    for g in groups:
        assert len(g) == 8
        for s in g:
            assert s.image is g[0].image and s.scene is g[0].scene
            assert task.answer_from_scene(s.scene, s.question) == s.answer
            assert s.answer in task.ANSWER_WORDS
    a, b = task.generate_packed(7, 3, 8), task.generate_packed(7, 3, 8)
    assert [[s.question + s.answer for s in g] for g in a] == [[s.question + s.answer for s in g] for g in b]


def test_relations_answer_the_neighbour_never_the_named_cell():
    for s in task.generate(11, 400, qtypes=["left_of", "above"]):
        (r, c), = s.relevant
        if s.qtype == "left_of":
            assert s.answer == s.scene.colour(r, c) != s.scene.colour(r, c + 1)
            assert f"row {task.row_word(r)} column {c + 2} " in s.question
        else:
            assert s.answer == s.scene.shape(r, c) != s.scene.shape(r + 1, c)
            assert f"row {task.row_word(r + 1)} column {c + 1} " in s.question


def test_packed_question_type_weights():
    groups = task.generate_packed(3, 40, 16, weights=[0, 1, 0, 3])
    kinds = [s.qtype for g in groups for s in g]
    assert set(kinds) == {"shape_at", "above"}
    assert 0.68 < kinds.count("above") / len(kinds) < 0.82  # 3:1 of 640 draws
    with pytest.raises(ValueError, match="one non-negative number per question type"):
        task.generate_packed(3, 1, 4, weights=[1, 1])


@pytest.mark.parametrize("qtype", task.QTYPES)
def test_cell_weights_pick_the_named_cell_and_answers_stay_correct(qtype):
    """generate_packed(cell_weights=...): the named cell is drawn by the weights, only among the cells the type
    may name in the region; named_cell recovers it from the sample."""
    g = task.GRID
    w = np.zeros((g, g))
    w[2, 2], w[1, 3], w[0, 0], w[6, 6] = 3.0, 1.0, 5.0, 5.0  # (0, 0) is askable only for lookups; (6, 6) not in 4x4
    groups = task.generate_packed(4, 30, 16, region=4, qtypes=[qtype], cell_weights={qtype: w})
    named = [task.named_cell(s) for grp in groups for s in grp]
    allowed = {(2, 2), (1, 3)} | ({(0, 0)} if qtype in ("colour_at", "shape_at") else set())
    assert set(named) == allowed
    for grp in groups:
        for s in grp:
            assert task.answer_from_scene(s.scene, s.question) == s.answer
            r, c = task.named_cell(s)
            assert f"row {task.row_word(r)} column {c + 1} " in s.question
    if qtype in ("left_of", "above"):
        assert 0.65 < named.count((2, 2)) / len(named) < 0.85  # 3:1 of 480 draws
    with pytest.raises(ValueError, match="shape"):
        task.cell_probabilities(np.ones((4, 4)), qtype)


def test_askable_cells_are_those_with_the_neighbour_inside_the_region():
    assert task.askable_cells("colour_at", 4).sum() == 16
    ok = task.askable_cells("left_of", 4)
    assert ok.sum() == 12 and not ok[:, 0].any() and ok[:4, 1:4].all()
    ok = task.askable_cells("above", 8)
    assert ok.sum() == 56 and not ok[0].any()
