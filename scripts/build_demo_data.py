"""Build the offline demo dataset for MiniMind-V from the ``easy-vqa`` package.

No internet is needed: everything comes from pip-installed packages.

* ``easy-vqa`` (MIT) ships 4000 train / 1000 test 64x64 images, each with one
  coloured shape (circle / rectangle / triangle in one of 8 colours) on a
  near-white background, plus single-word-answer questions about them.
* ``scikit-image`` and ``scikit-learn`` ship a handful of real photographs that
  we copy to ``dataset/eval_images/`` for qualitative checks.

Outputs (all JSON files are MiniMind-V v1 / LLaVA-style: one JSON array of
``{"id", "image", "conversations": [{"from": "human"}, {"from": "gpt"}]}``)::

    <out>/demo/pretrain.json        one caption record per train image
    <out>/demo/sft.json             one record per train question
    <out>/demo/test.json            one record per test question (evaluation only)
    <out>/demo/images/train/train_00012.png
    <out>/demo/images/test/test_00012.png
    <out>/eval_images/*.png|jpg     real photos

Captions are built from ground truth: the shape and colour of each image are
read off its easy-vqa questions and answers; where the questions leave them
ambiguous (about 10% of images) they are measured from the pixels (the palette
is exact and the shape follows from how much of its bounding box it fills).

Re-running is idempotent: JSON files are rewritten, images are only copied
when missing or changed, and stale ``train_*.png`` / ``test_*.png`` files from
an earlier, larger run are removed so the folders always match the JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import easy_vqa

SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
# easy-vqa draws shapes with these exact RGB values (checked against its data),
# which lets us recover a colour from the pixels when the questions don't say.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

# Three caption prompts, chosen by image id so the choice never depends on
# which subset is built.
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this picture?",
    "Give a short caption for this image.",
)
IMAGE_TOKEN = "<image>"

# Fill ratio (shape pixels / bounding-box pixels) thresholds, measured on
# easy-vqa train images: triangles 0.51-0.65, circles 0.73-0.90,
# rectangles 0.93-1.0.
TRIANGLE_MAX_FILL = 0.69
CIRCLE_MAX_FILL = 0.915

# easy-vqa backgrounds are random colours with every channel in [230, 255].
LIGHT_BACKGROUND_MIN = 200

NEGATION = re.compile(r"\bnot\b|^is no\b")


@dataclass
class Question:
    """One easy-vqa question, remembering its index in the original list."""

    index: int
    text: str
    answer: str
    image_id: int


@dataclass
class ImageLabel:
    """Ground-truth description of one easy-vqa image."""

    shape: str
    color: str
    background: str | None  # "light" or None when it is not near-white
    source: str  # "questions", "pixels" or "questions+pixels"


def load_questions(split: str) -> list[Question]:
    """Return all easy-vqa questions of ``split`` ("train" or "test")."""
    getter = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    texts, answers, image_ids = getter()
    return [Question(i, t, a, int(im)) for i, (t, a, im) in enumerate(zip(texts, answers, image_ids))]


def load_image_paths(split: str) -> dict[int, str]:
    """Return ``{image_id: path}`` of the easy-vqa images of ``split``."""
    getter = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
    return {int(k): v for k, v in getter().items()}


def labels_from_questions(questions: list[Question]) -> tuple[str | None, str | None]:
    """Narrow an image's shape and colour down using its questions.

    Open questions ("what color is the triangle?" -> "blue") fix both the
    answer and the word named in the question; yes/no questions ("is there not
    a red shape?" -> "yes") either fix or rule out the word they name.
    Returns ``None`` for an attribute the questions leave ambiguous.
    """
    shapes, colors = set(SHAPES), set(COLORS)
    for q in questions:
        words = re.findall(r"[a-z]+", q.text.lower())
        named_shapes = [w for w in words if w in SHAPES]
        named_colors = [w for w in words if w in COLORS]
        if q.answer in ("yes", "no"):
            present = (q.answer == "yes") != bool(NEGATION.search(q.text.lower()))
            for candidates, named in ((shapes, named_shapes), (colors, named_colors)):
                for word in named:
                    if present:
                        candidates &= {word}
                    else:
                        candidates.discard(word)
        else:
            # Only one shape per image, so anything it names is present.
            for word in named_shapes + ([q.answer] if q.answer in SHAPES else []):
                shapes &= {word}
            for word in named_colors + ([q.answer] if q.answer in COLORS else []):
                colors &= {word}
    shape = next(iter(shapes)) if len(shapes) == 1 else None
    color = next(iter(colors)) if len(colors) == 1 else None
    return shape, color


def labels_from_pixels(path: str) -> tuple[str, str, str | None]:
    """Measure shape, colour and background of an easy-vqa image from pixels."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    background = rgb[0, 0]
    mask = np.abs(rgb - background).sum(-1) > 60
    if not mask.any():  # degenerate: nothing drawn; fall back to defaults
        return SHAPES[0], COLORS[0], None
    # The most common foreground pixel is the (anti-aliasing free) fill colour.
    values, counts = np.unique(rgb[mask].reshape(-1, 3), axis=0, return_counts=True)
    fill = values[counts.argmax()]
    color = min(COLORS, key=lambda c: int(((np.array(PALETTE[c]) - fill) ** 2).sum()))
    ys, xs = np.nonzero(mask)
    fill_ratio = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if fill_ratio <= TRIANGLE_MAX_FILL:
        shape = "triangle"
    elif fill_ratio <= CIRCLE_MAX_FILL:
        shape = "circle"
    else:
        shape = "rectangle"
    bg = "light" if int(background.min()) >= LIGHT_BACKGROUND_MIN else None
    return shape, color, bg


def label_image(questions: list[Question], path: str) -> ImageLabel:
    """Combine question-derived labels (preferred) with pixel measurements."""
    q_shape, q_color = labels_from_questions(questions)
    p_shape, p_color, background = labels_from_pixels(path)
    if q_shape and q_color:
        source = "questions"
    elif q_shape or q_color:
        source = "questions+pixels"
    else:
        source = "pixels"
    return ImageLabel(q_shape or p_shape, q_color or p_color, background, source)


def caption_for(label: ImageLabel) -> str:
    """Caption text, e.g. ``"a blue triangle on a light background."``."""
    text = f"a {label.color} {label.shape}"
    if label.background:
        text += f" on a {label.background} background"
    return text + "."


def record(record_id: str, image: str, prompt: str, answer: str) -> dict:
    """One MiniMind-V v1 conversation record with a single exchange."""
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
    }


def image_file_name(split: str, image_id: int) -> str:
    """File name used in the demo folders, e.g. ``train_00012.png``."""
    return f"{split}_{image_id:05d}.png"


def sync_images(split: str, image_ids: list[int], sources: dict[int, str], target: Path) -> int:
    """Copy the chosen images to ``target`` and drop stale ones; return copies made."""
    target.mkdir(parents=True, exist_ok=True)
    wanted = {image_file_name(split, i): sources[i] for i in image_ids}
    copied = 0
    for name, src in wanted.items():
        dst = target / name
        if dst.exists() and dst.stat().st_size == os.path.getsize(src):
            continue  # already there from an earlier run
        shutil.copyfile(src, dst)
        copied += 1
    # Only remove files following our own naming scheme, never anything else.
    pattern = re.compile(rf"^{split}_\d{{5}}\.png$")
    for existing in target.iterdir():
        if pattern.match(existing.name) and existing.name not in wanted:
            existing.unlink()
    return copied


def write_json(path: Path, records: list[dict]) -> None:
    """Write ``records`` atomically so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    tmp.replace(path)


def _gray_to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a bool/float image to uint8 so PIL can save it."""
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 1) if image.max() <= 1 else np.clip(image, 0, 255) / 255
        return (image * 255).astype(np.uint8)
    return image


def build_eval_images(target: Path, max_side: int = 1024) -> list[str]:
    """Save real photos shipped inside scikit-image / scikit-learn to ``target``.

    Only images bundled with the wheels are used (several ``skimage.data``
    images would need a pooch download). Each one is optional: a loader that
    fails is skipped, so a different scikit-image version never breaks a build.
    """
    import skimage.data as skd

    target.mkdir(parents=True, exist_ok=True)
    sources = {
        "astronaut.png": lambda: skd.astronaut(),
        "cat.png": lambda: skd.chelsea(),
        "coffee.png": lambda: skd.coffee(),
        "rocket.png": lambda: skd.rocket(),
        "cameraman.png": lambda: skd.camera(),
        "coins.png": lambda: skd.coins(),
        "moon.png": lambda: skd.moon(),
        "clock.png": lambda: skd.clock(),
        "motorcycle.png": lambda: skd.stereo_motorcycle()[0],
        "hubble_deep_field.png": lambda: skd.hubble_deep_field(),
        "immunohistochemistry.png": lambda: skd.immunohistochemistry(),
        "retina.png": lambda: skd.retina(),
    }
    written: list[str] = []
    for name, load in sources.items():
        path = target / name
        if not path.exists():
            try:
                array = _gray_to_uint8(np.asarray(load()))
            except Exception as err:  # noqa: BLE001 - an optional image must never abort the build
                print(f"  [eval_images] skipped {name}: {type(err).__name__}: {err}"[:200])
                continue
            image = Image.fromarray(array)
            image.thumbnail((max_side, max_side))  # keeps the folder small
            image.save(path)
        written.append(name)

    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for src, name in zip(sample.filenames, ("china_temple.jpg", "flower.jpg")):
            path = target / name
            if not path.exists():
                shutil.copyfile(src, path)  # already JPEG: copy the original bytes
            written.append(name)
    except Exception as err:  # noqa: BLE001 - optional, see above
        print(f"  [eval_images] skipped scikit-learn samples: {type(err).__name__}: {err}"[:200])
    return written


def choose_subset(items: list, limit: int | None, rng: random.Random) -> list:
    """Deterministic random subset of size ``limit`` (kept in original order)."""
    if limit is None or limit >= len(items):
        return list(items)
    picked = set(rng.sample(range(len(items)), limit))
    return [item for i, item in enumerate(items) if i in picked]


def question_type(text: str) -> str:
    """Coarse question type used by the 'prior' baseline: shape, color or yes/no."""
    t = text.lower()
    if t.startswith("what color") or t.startswith("what is the color"):
        return "color"
    if t.startswith("what"):  # "what shape ...", "what is the blue shape?"
        return "shape"
    return "yes/no"


def build(
    out: str = "dataset",
    max_train_images: int | None = None,
    max_test_questions: int | None = None,
    seed: int = 0,
    with_eval_images: bool = True,
) -> dict:
    """Build the demo dataset under ``out``; return a summary dict (also printed)."""
    rng = random.Random(seed)
    out_dir = Path(out)
    demo = out_dir / "demo"

    train_questions = load_questions("train")
    test_questions = load_questions("test")
    train_paths = load_image_paths("train")
    test_paths = load_image_paths("test")

    train_ids = choose_subset(sorted(train_paths), max_train_images, rng)
    train_id_set = set(train_ids)
    by_image: dict[int, list[Question]] = collections.defaultdict(list)
    for q in train_questions:
        by_image[q.image_id].append(q)

    pretrain: list[dict] = []
    label_sources: collections.Counter = collections.Counter()
    for image_id in train_ids:
        label = label_image(by_image[image_id], train_paths[image_id])
        label_sources[label.source] += 1
        prompt = CAPTION_PROMPTS[image_id % len(CAPTION_PROMPTS)]
        pretrain.append(record(f"train_{image_id:05d}_caption", image_file_name("train", image_id), prompt, caption_for(label)))

    sft = [
        record(f"train_q{q.index:06d}", image_file_name("train", q.image_id), q.text, q.answer)
        for q in train_questions
        if q.image_id in train_id_set
    ]

    test_subset = choose_subset(test_questions, max_test_questions, rng)
    test = [record(f"test_q{q.index:05d}", image_file_name("test", q.image_id), q.text, q.answer) for q in test_subset]
    test_ids = sorted({q.image_id for q in test_subset})

    write_json(demo / "pretrain.json", pretrain)
    write_json(demo / "sft.json", sft)
    write_json(demo / "test.json", test)
    copied = sync_images("train", train_ids, train_paths, demo / "images" / "train")
    copied += sync_images("test", test_ids, test_paths, demo / "images" / "test")
    eval_images = build_eval_images(out_dir / "eval_images") if with_eval_images else []

    # Baselines that never look at the image: how far text priors alone get.
    sft_answers = collections.Counter(q.answer for q in train_questions if q.image_id in train_id_set)
    test_answers = collections.Counter(q.answer for q in test_subset)
    majority_answer = sft_answers.most_common(1)[0][0] if sft_answers else "yes"
    majority_acc = test_answers[majority_answer] / max(1, len(test_subset))
    per_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q in train_questions:
        if q.image_id in train_id_set:
            per_type[question_type(q.text)][q.answer] += 1
    prior_hits = sum(
        1
        for q in test_subset
        if per_type[question_type(q.text)] and per_type[question_type(q.text)].most_common(1)[0][0] == q.answer
    )
    summary = {
        "train_images": len(train_ids),
        "pretrain_records": len(pretrain),
        "sft_records": len(sft),
        "test_questions": len(test),
        "test_images": len(test_ids),
        "images_copied_this_run": copied,
        "caption_label_sources": dict(label_sources),
        "answers": sorted(easy_vqa.get_answers()),
        "test_answer_distribution": dict(test_answers.most_common()),
        "majority_answer": majority_answer,
        "majority_baseline_accuracy": majority_acc,
        "question_type_prior_accuracy": prior_hits / max(1, len(test_subset)),
        "eval_images": eval_images,
    }
    return summary


def print_summary(summary: dict, out: str, seconds: float) -> None:
    """Human-readable summary of :func:`build`'s result."""
    print(f"demo dataset written to {Path(out) / 'demo'} in {seconds:.1f}s")
    print(
        f"  train images {summary['train_images']} | pretrain records {summary['pretrain_records']}"
        f" | sft records {summary['sft_records']} | test questions {summary['test_questions']}"
        f" ({summary['test_images']} images) | images copied now {summary['images_copied_this_run']}"
    )
    print(f"  caption labels from: {summary['caption_label_sources']}")
    n = max(1, summary["test_questions"])
    dist = ", ".join(f"{a} {c} ({c / n:.1%})" for a, c in summary["test_answer_distribution"].items())
    print(f"  test answers: {dist}")
    print(
        f"  majority-answer baseline on test (always '{summary['majority_answer']}'): "
        f"{summary['majority_baseline_accuracy']:.1%}"
    )
    print(f"  question-type prior baseline on test (no image): {summary['question_type_prior_accuracy']:.1%}")
    print(f"  eval images ({len(summary['eval_images'])}) in {Path(out) / 'eval_images'}: {', '.join(summary['eval_images'])}")


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="dataset", help="output root (demo/ and eval_images/ go under it)")
    parser.add_argument("--max_train_images", type=int, default=None, help="use only N train images (CI)")
    parser.add_argument("--max_test_questions", type=int, default=None, help="use only N test questions (CI)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the subsets above")
    parser.add_argument("--no_eval_images", action="store_true", help="skip the real photos")
    args = parser.parse_args(argv)
    start = time.time()
    summary = build(args.out, args.max_train_images, args.max_test_questions, args.seed, not args.no_eval_images)
    print_summary(summary, args.out, time.time() - start)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
