import pytest

from df_agent.prompt_sets import families, load_prompts


def test_dualfocus_prompts_are_the_official_wording() -> None:
    prompts = load_prompts("dualfocus")
    q = "What is on the sign?"
    assert prompts.locate.format(question=q) == (
        "Please provide the bounding box coordinate of the region this question asks: What is on the sign?"
    )
    assert prompts.micro.format(question=q) == (
        "Please combine the information from these two images and answer this question: What is on the sign?"
    )
    assert prompts.score.format(question=q) == (
        "Please combine the information from these two images and answer this question: What is on the sign?"
        "\nAnswer the question using a single word or phrase"
    )
    assert prompts.macro.format(question=q) == q


def test_options_are_lettered_with_the_letter_hint() -> None:
    text = load_prompts("dualfocus").with_options("Which colour?", ["red", "blue"])
    assert (
        text
        == "Which colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    )
    assert load_prompts("dualfocus").with_options("Which colour?", None) == "Which colour?"


def test_every_family_has_every_step_with_a_question_slot() -> None:
    assert {"dualfocus", "qwen2_vl"} <= set(families())
    for family in families():
        prompts = load_prompts(family)
        for step in ("macro", "locate", "micro", "score"):
            assert "{question}" in getattr(prompts, step)


def test_unknown_family_names_the_shipped_ones() -> None:
    with pytest.raises(ValueError, match="dualfocus"):
        load_prompts("nope")
