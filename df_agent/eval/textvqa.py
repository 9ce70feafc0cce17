"""TextVQA: the official val file (ten human answers per question) and the official VQA accuracy.

The accuracy follows the TextVQA evaluation (the EvalAI answer processor of the VQA challenge): every
answer, predicted or human, is lower-cased, stripped of commas and question marks, its "'s" split off,
its punctuation removed or replaced by a space, its periods dropped unless a digit follows, its number
words written as digits ("two" -> "2"), its articles (a, an, the) removed and its contractions given
their apostrophe ("dont" -> "don't"; the "'s" is split off first, so "what's" becomes "what 's" while
"whats" becomes "what's", as in the official code). A prediction then scores ``min(1, matches / 3)``
against each subset of nine of the ten human answers, averaged over the ten subsets: 1 match is 0.3, 2
are 0.6, 3 are 0.9, 4 or more 1.0.

OCR tokens (from the Rosetta OCR file that ships with TextVQA, or an ``ocr_tokens`` field of the
question records) can be put in the prompt the way LLaVA-1.5 does: the question followed by a new line
and ``Reference OCR token: tok1, tok2, ...``. LLaVA-1.5-7B scores 58.2 with them and about 48 without;
a report must say which was used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from df_agent.eval.harness import Benchmark
from df_agent.eval.items import EvalItem

# Punctuation the VQA normaliser removes (when next to a space) or replaces by a space.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
# A period not followed by a digit (the official pattern's look-behind is written so that it never
# applies; we keep the behaviour, so "5." loses its period and "3.5" keeps it).
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# The VQA normaliser's contraction table: a word written without its apostrophe(s) -> with them.
# Keys with capitals (Im, Ive, Id've) never match a lower-cased answer; they are kept as the official
# table has them, and so is its one odd entry (somebody'd -> somebodyd).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
OCR_PROMPT = "{question}\nReference OCR token: {tokens}"


def _punctuation(text: str) -> str:
    glued_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if glued_number or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as the official TextVQA evaluation compares it (see the module docstring).

    Example: ``"The Two Dogs."`` -> ``"2 dogs"``; ``"dont"`` -> ``"don't"``.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one raw prediction against the human answers (ten in TextVQA).

    Both sides are normalised with `normalize_answer`; the prediction then scores
    ``min(1, matches / 3)`` against every leave-one-out subset of the answers, averaged.

    Args:
        prediction: The model's raw answer.
        answers: The human answers (ten per TextVQA question).

    Returns:
        The accuracy in 0..1.

    Raises:
        ValueError: If `answers` is empty.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(a) == predicted for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - hit) / 3) for hit in matches) / len(matches)


def read_questions(
    path: str | Path,
    image_root: str | Path,
    *,
    ocr_path: str | Path | None = None,
    ocr_in_prompt: bool = False,
) -> list[EvalItem]:
    """Read the official TextVQA json (``{"data": [{question_id, image_id, question, answers}, ...]}``).

    Args:
        path: ``TextVQA_0.5.1_val.json`` (or any file of that schema).
        image_root: The folder holding ``{image_id}.jpg`` (``train_images/`` for the val set).
        ocr_path: The Rosetta OCR file (``{"data": [{image_id, ocr_tokens}, ...]}``), if the
            questions themselves carry no ``ocr_tokens``.
        ocr_in_prompt: Put the OCR tokens in the prompt (`OCR_PROMPT`).

    Returns:
        One item per question, its category "textvqa", its answers the human ones.

    Raises:
        ValueError: If the file is not of that schema, or OCR tokens are asked for and missing.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        records = data["data"] if isinstance(data, dict) else data
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a TextVQA question file ({{'data': [...]}}): {err!r}") from None
    ocr: dict[str, list[str]] = {}
    if ocr_path is not None:
        try:
            ocr_data = json.loads(Path(ocr_path).read_text(encoding="utf-8"))
            ocr = {str(r["image_id"]): list(r["ocr_tokens"]) for r in ocr_data["data"]}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{ocr_path}: not a TextVQA OCR file: {err!r}") from None
    items = []
    for index, record in enumerate(records):
        try:
            question = record["question"]
            image_id = str(record["image_id"])
            if ocr_in_prompt:
                tokens = record.get("ocr_tokens", ocr.get(image_id))
                if tokens is None:
                    raise ValueError(f"no OCR tokens for image {image_id} (pass the OCR file)")
                question = OCR_PROMPT.format(question=question, tokens=", ".join(tokens))
            items.append(
                EvalItem(
                    id=str(record["question_id"]),
                    image=str(Path(image_root) / f"{image_id}.jpg"),
                    question=question,
                    answers=[str(a) for a in record["answers"]],
                    category="textvqa",
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: question {index}: {err!r}") from None
    return items


def judge(prediction: str, item: EvalItem) -> float:
    """The official VQA accuracy of the prediction against the item's human answers."""
    return vqa_accuracy(prediction, item.answers)


def benchmark(
    path: str | Path,
    image_root: str | Path,
    *,
    ocr_path: str | Path | None = None,
    ocr_in_prompt: bool = False,
) -> Benchmark:
    """TextVQA scored with `vqa_accuracy`; the settings record whether OCR tokens were in the prompt."""
    return Benchmark(
        name="textvqa",
        items=read_questions(path, image_root, ocr_path=ocr_path, ocr_in_prompt=ocr_in_prompt),
        judge=judge,
        settings={"questions": str(path), "images": str(image_root), "ocr_tokens_in_prompt": ocr_in_prompt},
    )


__all__ = ["OCR_PROMPT", "benchmark", "judge", "normalize_answer", "read_questions", "vqa_accuracy"]
