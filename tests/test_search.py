"""Search mode: tiles, the presence question, batched scoring, boxes in the root frame, model calls."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import BareBackend, GenerationLogprobsBackend, ScriptedBackend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from df_agent.backends.base import Backend, Conversation
from df_agent.boxes import Box
from df_agent.engine import DualFocus
from df_agent.prompt_sets import load_prompts
from df_agent.search import NO_TILING_RATIO, presence_question, target_phrase, tile_boxes

# -- tile layout ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    tile_side=st.integers(8, 700),
    overlap_fraction=st.floats(0, 0.9),
)
def test_tiles_cover_the_image_overlap_and_stay_inside(
    width: int, height: int, tile_side: int, overlap_fraction: float
) -> None:
    overlap = int(overlap_fraction * tile_side)
    stride = tile_side - overlap
    assume((width / stride + 2) * (height / stride + 2) < 2000)  # keep each example fast
    tiles = tile_boxes((width, height), tile_side, overlap)
    xs = sorted({t.x1 for t in tiles})
    ys = sorted({t.y1 for t in tiles})
    assert len(tiles) == len(xs) * len(ys)  # a grid, row by row
    for tile in tiles:
        assert 0 <= tile.x1 < tile.x2 <= width and 0 <= tile.y1 < tile.y2 <= height
        assert tile.width == min(tile_side, width) and tile.height == min(tile_side, height)
    # the first tile starts at the edge, the last ends at the opposite one
    assert xs[0] == 0 and ys[0] == 0
    assert max(t.x2 for t in tiles) == width and max(t.y2 for t in tiles) == height
    # neighbours share at least `overlap` pixels: any object up to that size lies inside one tile
    for starts, length in ((xs, width), (ys, height)):
        for a, b in itertools.pairwise(starts):
            assert a + min(tile_side, length) - b >= overlap
    # no tile more than needed: one fewer per axis would leave a gap or too little overlap
    if width > tile_side:
        assert (len(xs) - 2) * (tile_side - overlap) < width - tile_side


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(400, 2000),
    side=st.integers(1, 80),
    x=st.floats(0, 1),
    y=st.floats(0, 1),
)
def test_every_object_up_to_the_overlap_lies_wholly_inside_a_tile(
    size: int, side: int, x: float, y: float
) -> None:
    tiles = tile_boxes((size, size), 320, 80)
    left, top = x * (size - side), y * (size - side)
    thing = Box(x1=left, y1=top, x2=left + side, y2=top + side)
    assert any(t.x1 <= thing.x1 and t.y1 <= thing.y1 and thing.x2 <= t.x2 and thing.y2 <= t.y2 for t in tiles)


def test_the_hr_canvas_is_five_by_five_tiles() -> None:
    tiles = tile_boxes((1280, 1280), 320, 80)
    assert len(tiles) == 25
    assert [t.x1 for t in tiles[:5]] == [0, 240, 480, 720, 960]
    assert tiles[5].y1 == 240 and tiles[-1] == Box(x1=960, y1=960, x2=1280, y2=1280)


@pytest.mark.parametrize(("side", "overlap"), [(0, 0), (100, 100), (100, -1)])
def test_bad_tile_settings_are_refused(side: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_boxes((500, 500), side, overlap)
    with pytest.raises(ValueError, match="search_"):
        DualFocus(ScriptedBackend(), search_tile_side=side, search_overlap=overlap)


# -- the presence question -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "target"),
    [
        ("What number is on the red circle?", "red circle"),
        ("What color is the star?", "star"),
        ("Is there a green square?", "green square"),
        ("Is there an orange hexagon?", "orange hexagon"),
        ("what  is written on the sign near the door ?", "sign near the door"),
        ("What number is on the blue diamond in the image?", "blue diamond"),
        ("How many objects are there?", None),
        ("What is in the picture?", None),
    ],
)
def test_the_object_a_question_names(question: str, target: str | None) -> None:
    assert target_phrase(question) == target


def test_presence_question_uses_the_family_template_and_the_right_article() -> None:
    prompts = load_prompts("dualfocus")
    assert presence_question("What number is on the red circle?", prompts) == "Is there a red circle?"
    assert presence_question("What number is on the orange star?", prompts) == "Is there an orange star?"
    assert presence_question("How many objects are there?", prompts) is None
    # families without their own file use the DualFocus one
    assert load_prompts("chat").presence == prompts.presence == "Is there {object}?"


# -- search mode on scripted backends ------------------------------------------------------------


def big_scene(size: tuple[int, int] = (1280, 960), square: tuple[int, int] = (1000, 700)) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 230))
    x, y = square
    ImageDraw.Draw(image).rectangle((x, y, x + 50, y + 50), fill=(220, 30, 30))
    return image


class TileScorer(ScriptedBackend):
    """Scores "yes" best on the tile whose pixels hold the red square; counts score_many calls."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.batches = 0

    def score_many(self, items):
        self.batches += 1
        return [[-self.red(c.images[0]), 0.0] for c, _ in items]

    @staticmethod
    def red(image: Image.Image) -> float:
        """The fraction of the image's pixels that are the square's red."""
        pixels = np.asarray(image.convert("RGB"))
        return float(((pixels[..., 0] > 200) & (pixels[..., 1] < 60)).mean())


def test_search_runs_dualfocus_on_the_best_tile_and_reports_root_pixels() -> None:
    # the model's box [0.25,0.25,0.50,0.50] is in the tile's frame
    backend = TileScorer(macro="3", micro="7", scores={"3": 2.0, "7": 1.0})
    result = DualFocus(backend, margin=0, min_side=0).ask(
        big_scene(), "What number is on the red square?", mode="search"
    )
    search = result.search
    assert search is not None and search.ranked_by == "prompt_logprobs" and backend.batches == 1
    assert search.presence_question == "Is there a red square?"
    assert len(search.tiles) == len(search.scores) == 5 * 4  # 1280 x 960 in 320 px tiles, overlap 80
    tile = search.tile
    assert tile == search.tiles[max(range(20), key=search.scores.__getitem__)]
    assert tile.x1 <= 1000 and tile.y1 <= 700 and tile.x2 >= 1050 and tile.y2 >= 750
    # every step after the search saw the tile at full resolution
    macro_image = backend.generated[0][1].images[0]
    assert macro_image.size == (320, 320)
    assert np.array_equal(np.asarray(macro_image), np.asarray(big_scene().crop(tile.as_int_tuple())))
    expected = Box(x1=tile.x1 + 80, y1=tile.y1 + 80, x2=tile.x1 + 160, y2=tile.y1 + 160)
    assert result.box == expected and result.crop_box == expected  # no margin, already square
    assert result.crop.size == (80, 80)
    assert np.array_equal(np.asarray(result.crop), np.asarray(big_scene().crop(expected.as_int_tuple())))
    assert result.answer == "7" and result.path == "micro" and result.image_size == (1280, 960)
    # 1 ranking + macro + box + micro + the vote's scoring
    assert result.model_calls == 5


def test_search_with_a_margin_clips_the_crop_to_the_tile_and_maps_it_back() -> None:
    backend = TileScorer(box="[0.0,0.0,0.1,0.1]")
    result = DualFocus(backend, margin=25, min_side=0).ask(
        big_scene(), "What number is on the red square?", mode="search"
    )
    tile = result.search.tile
    assert result.box == Box(x1=tile.x1, y1=tile.y1, x2=tile.x1 + 32, y2=tile.y1 + 32)
    assert result.crop_box == Box(x1=tile.x1, y1=tile.y1, x2=tile.x1 + 57, y2=tile.y1 + 57)


def test_a_small_image_is_not_tiled(scene: Image.Image) -> None:
    backend = ScriptedBackend()
    result = DualFocus(backend).ask(scene, "What number is on the red square?", mode="search")
    plain = DualFocus(ScriptedBackend()).ask(scene, "What number is on the red square?")
    assert result.search.tile is None and result.search.tiles == [] and "no tiling" in result.search.reason
    assert (
        result.box == plain.box and result.answer == plain.answer and result.model_calls == plain.model_calls
    )
    # the limit is 1.5 tile sides, overridable
    edge = int(NO_TILING_RATIO * 100)
    engine = DualFocus(ScriptedBackend(), search_tile_side=100, search_overlap=20)
    assert engine.search(Image.new("RGB", (edge, 40)), "What is on the red square?").tile is None
    assert engine.search(Image.new("RGB", (edge + 1, 40)), "What is on the red square?").tile is not None


def test_a_question_naming_no_object_runs_plain_dualfocus() -> None:
    result = DualFocus(ScriptedBackend()).ask(big_scene(), "How many objects are there?", mode="search")
    assert result.search.tile is None and "names no object" in result.search.reason
    assert result.box == Box(x1=320, y1=240, x2=640, y2=480)  # the whole image's frame
    assert result.model_calls == 4


def test_a_backend_with_generation_logprobs_ranks_by_generated_answers() -> None:
    class Looking(GenerationLogprobsBackend):
        """Sure "yes" where the whole square is in view, an unsure "Yes." where part of it is."""

        def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
            if conversation.turns[-1].text.startswith("Is there"):
                red = TileScorer.red(conversation.images[0]) * 320 * 320
                return "yes" if red > 2500 else "Yes." if red > 0 else "no"
            return super().generate(conversation, max_new_tokens)

    result = DualFocus(Looking(nlls={"yes": 0.1, "Yes.": 2.0})).ask(
        big_scene(), "What number is on the red square?", mode="search"
    )
    search = result.search
    assert search.ranked_by == "generation_logprobs"
    tile = search.tile
    assert tile.x1 <= 1000 and tile.y1 <= 700 and tile.x2 >= 1050 and tile.y2 >= 750
    # one presence request per tile, then macro, box and micro (the vote uses their log-probabilities)
    assert result.model_calls == 20 + 3


def test_a_backend_that_cannot_rank_falls_back_to_plain_dualfocus_and_says_why() -> None:
    result = DualFocus(BareBackend()).ask(big_scene(), "What number is on the red square?", mode="search")
    assert result.search.tile is None and "cannot be ranked" in result.search.reason
    assert len(result.search.tiles) == 20 and result.search.scores is None
    assert result.answer == "blue" and result.model_calls == 3


def test_observers_see_the_search_step() -> None:
    seen = []

    class Watcher:
        def start(self, step, inputs):
            seen.append(step)
            return self

        def end(self, outputs, seconds):
            pass

        def fail(self, error, seconds):
            pass

    DualFocus(TileScorer(), observers=[Watcher()]).ask(
        big_scene(), "What number is on the red square?", mode="search"
    )
    assert seen[0] == "search" and "macro" in seen and "micro" in seen


# -- model calls in every mode -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "session", "calls"),
    [
        ("macro", True, 1),
        ("micro", True, 2),  # box, micro
        ("dualfocus", True, 4),  # macro, box, micro, the vote's scoring
        ("dualfocus", False, 4),  # the plain path makes the same requests, one at a time
        ("auto", True, 5),  # macro, its confidence (scored), box, micro, vote
        ("search", True, 4),  # a small image: plain DualFocus
    ],
)
def test_model_calls_count_every_request(scene: Image.Image, mode: str, session: bool, calls: int) -> None:
    backend = ScriptedBackend(macro="3", micro="7")
    result = DualFocus(backend, session=session, auto_threshold=-1.0).ask(scene, "What is on it?", mode=mode)
    assert result.model_calls == calls == len(backend.generated) + len(backend.scored)


def test_model_calls_count_the_judge_and_own_context_votes(scene: Image.Image) -> None:
    judge = DualFocus(BareBackend(macro="3", micro="7"), unscored_vote="judge").ask(scene, "What is on it?")
    assert judge.vote == "judge" and judge.model_calls == 4
    own = DualFocus(ScriptedBackend(macro="3", micro="7"), arbitration="own_context").ask(scene, "What?")
    assert own.model_calls == 5  # two scoring requests, one per context
    agree = DualFocus(ScriptedBackend(macro="3", micro="3")).ask(scene, "What?")
    assert agree.model_calls == 3  # no vote needed


# -- score_many on real models -------------------------------------------------------------------


def score_many_items(size: int) -> list[tuple[Conversation, tuple[str, ...]]]:
    images = [big_scene((size, size), (size // 4 * k, size // 3)) for k in range(3)]
    return [(Conversation().user("Is there a red square?", [image]), ("yes", "no")) for image in images] + [
        (Conversation().user("What color is it?", [images[0]]), ("red", "blue square", "7"))
    ]


def assert_score_many_matches_score(backend: Backend, size: int) -> None:
    items = score_many_items(size)
    batched = backend.score_many(items)
    assert [len(scores) for scores in batched] == [2, 2, 2, 3]
    for (conversation, candidates), scores in zip(items, batched, strict=True):
        assert scores == pytest.approx(backend.score(conversation, candidates), abs=1e-4)
    assert backend.score_many([]) == []


def test_score_many_equals_score_on_a_tiny_random_llava(tiny_llava_backend) -> None:
    assert_score_many_matches_score(tiny_llava_backend, 96)
    with tiny_llava_backend.session():  # the batched pass serves sessions too
        assert_score_many_matches_score(tiny_llava_backend, 96)


@pytest.fixture(scope="module")
def shipped():
    from df_agent.backends.hf import HFBackend

    return HFBackend.from_pretrained(device="cpu")


def test_score_many_equals_score_on_the_shipped_model(shipped) -> None:
    assert_score_many_matches_score(shipped, 320)


def test_base_score_many_loops_over_score() -> None:
    backend = ScriptedBackend(scores={"yes": 0.5, "no": 2.0})
    items = score_many_items(64)[:2]
    assert backend.score_many(items) == [[0.5, 2.0], [0.5, 2.0]]
    assert [candidates for _, candidates in backend.scored] == [["yes", "no"], ["yes", "no"]]


@pytest.mark.slow
def test_search_on_the_shipped_model_finds_and_reads_the_digit(shipped) -> None:
    from df_agent.data.focusshapes import generate

    scenes, records = generate(424242, 1, preset="hr")
    detail = next(r for r in records if r.qtype == "detail")
    target = Box(x1=detail.box[0], y1=detail.box[1], x2=detail.box[2], y2=detail.box[3])
    engine = DualFocus(shipped)
    result = engine.ask(scenes[0].image, detail.question, mode="search")
    tile = result.search.tile
    assert tile.x1 <= target.x1 and tile.y1 <= target.y1 and tile.x2 >= target.x2 and tile.y2 >= target.y2
    assert result.box.iou(target) > 0.5  # in the root image's pixels
    assert result.answer == detail.answer
    assert result.model_calls <= 6
