"""How often the shipped model's input warnings fire: on FocusShapes and on photo-like images.

    python bench/warnings.py [--scenes 2000] [--per-kind 200]

Prints, for FocusShapes scenes (what the model was trained on; every warning there is a false
alarm) and for synthetic photo-like images of several kinds (every miss there is a silent
answer), the share flagged "not a FocusShapes scene", the palette shares behind it, and the
share of questions with words unknown to the shipped tokenizer.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from df_agent.backends.caveats import looks_like_focusshapes, palette_share, unknown_words
from df_agent.data.focusshapes import generate


def gradient(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """A linear gradient between two random colours, horizontal or vertical."""
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None] * np.ones((size, 1, 1))
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    return Image.fromarray((start * (1 - t) + end * t).astype(np.uint8))


def noise(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """Uniform colour noise."""
    return Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))


def text(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """Lines of text: black on white (a document) or random colours."""
    if rng.random() < 0.5:
        background, ink = (255, 255, 255), (0, 0, 0)
    else:
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        ink = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=int(rng.integers(14, 30)))
    for y in range(10, size - 20, int(rng.integers(24, 60))):
        draw.text((10, y), "The quick brown fox 1234", fill=ink, font=font)
    return image


def natural(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """A smooth, photo-like field: blurred, upsampled colour noise around a random base colour."""
    base = rng.integers(30, 225, 3)
    coarse = np.clip(base + 60 * rng.normal(0, 1, (8, 8, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return image.filter(ImageFilter.GaussianBlur(6))


def gradient_with_text(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """A gradient with a caption on it (the issue's suggested non-FocusShapes test picture)."""
    image = gradient(rng, size)
    ImageDraw.Draw(image).text(
        (20, size // 2), "HELLO 42", fill=(255, 255, 255), font=ImageFont.load_default(32)
    )
    return image


def sky_and_field(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """A landscape-like picture: blue sky over green ground, a sun, soft noise."""
    sky = rng.integers(0, 40, 3) + np.array([120, 170, 220])
    ground = rng.integers(0, 40, 3) + np.array([40, 110, 30])
    pixels = np.empty((size, size, 3), np.float32)
    horizon = int(rng.integers(size // 3, 2 * size // 3))
    pixels[:horizon], pixels[horizon:] = sky, ground
    pixels += rng.normal(0, 8, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    x, y = int(rng.integers(30, size - 30)), int(rng.integers(10, max(11, horizon - 30)))
    ImageDraw.Draw(image).ellipse((x - 20, y - 20, x + 20, y + 20), fill=(250, 230, 120))
    return image.filter(ImageFilter.GaussianBlur(1))


KINDS = {
    "gradient": gradient,
    "noise": noise,
    "text": text,
    "natural": natural,
    "gradient+text": gradient_with_text,
    "sky+field": sky_and_field,
}
FREE_QUESTIONS = [
    "What is the person wearing?",
    "What kind of building is this?",
    "What color is the flower?",
    "What is written on the small sign?",
    "How many people are in the picture?",
]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000, help="FocusShapes scenes (default 2000)")
    parser.add_argument("--per-kind", type=int, default=200, help="photo-like images per kind (default 200)")
    parser.add_argument("--seed", type=int, default=77)
    args = parser.parse_args()

    scenes, records = generate(args.seed, args.scenes)
    shares = np.array([palette_share(scene.image) for scene in scenes])
    flagged = sum(not looks_like_focusshapes(scene.image) for scene in scenes)
    print(f"FocusShapes ({len(scenes)} scenes, seed {args.seed}): flagged {flagged / len(scenes):.2%}")
    for quality in (90, 75):
        saved = sum(not looks_like_focusshapes(_jpeg(scene.image, quality)) for scene in scenes[:500])
        print(f"  the first 500 saved as JPEG quality {quality}: flagged {saved / 500:.2%}")
    print(
        f"  lowest shares: familiar {shares[:, 0].min():.3f}, colour {shares[:, 1].min():.3f}, "
        f"canvas {shares[:, 2].min():.3f}"
    )
    rng = np.random.default_rng(args.seed)
    for name, make in KINDS.items():
        images = [make(rng) for _ in range(args.per_kind)]
        kind = np.array([palette_share(image) for image in images])
        caught = sum(not looks_like_focusshapes(image) for image in images)
        print(
            f"{name:14s} ({args.per_kind}): flagged {caught / args.per_kind:.2%}  "
            f"(familiar max {kind[:, 0].max():.3f}, median {np.median(kind[:, 0]):.3f})"
        )

    from transformers import AutoTokenizer

    from df_agent.backends.hf import shipped_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(shipped_model_path()))
    questions = [record.question for record in records]
    with_unknown = sum(bool(unknown_words(tokenizer, q)) for q in questions)
    print(f"unknown words: {with_unknown}/{len(questions)} FocusShapes questions")
    for question in FREE_QUESTIONS:
        print(f"  {question!r}: unknown {unknown_words(tokenizer, question)}")


if __name__ == "__main__":
    main()
