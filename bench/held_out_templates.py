"""Held-out accuracy of a demo checkpoint by question template: which easy-VQA questions it gets wrong.

`3-eval_chat.py --eval_data` reports three types (colour, shape, yes/no). This splits them further: each question
with its colour word replaced by <C> and its shape word by <S> ("is there a <S>?", "what is the <C> shape?"), and
prints each template's accuracy, worst first, then how the shape answers were confused.

    python bench/held_out_templates.py --ckpt out/128_vlm_sft.pth --clip_path model/clip_model/stand_in_clip_vit_b32

The answers are the greedy ones 3-eval_chat.py scores (evaluation.held_out.answer_accuracy), so the overall line
matches its `accuracy:` line.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluation.held_out import answer_accuracy  # noqa: E402
from inference.chat import VLMChat  # noqa: E402

COLOURS = re.compile(r"\b(red|green|blue|black|gray|grey|yellow|teal|brown)\b")
SHAPES = ("circle", "rectangle", "triangle")


def template(question: str) -> str:
    """The question with its colour word as <C> and its shape word as <S>."""
    return re.sub(r"\b(" + "|".join(SHAPES) + r")\b", "<S>", COLOURS.sub("<C>", question))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/128_vlm_sft.pth")
    p.add_argument("--clip_path", default="model/clip_model/stand_in_clip_vit_b32")
    p.add_argument("--eval_data", default="dataset/demo/test.json")
    p.add_argument("--eval_images_path", default="dataset/demo/images/test")
    args = p.parse_args()
    chat = VLMChat.load(args.ckpt, clip_path=args.clip_path, device="cpu")
    acc = answer_accuracy(chat, args.eval_data, args.eval_images_path)
    print(acc.line())
    per_template: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    confusions: collections.Counter = collections.Counter()
    for (question, answer), predicted, hit in zip(acc.questions, acc.predictions, acc.hits):
        counts = per_template[template(question)]
        counts[0] += hit
        counts[1] += 1
        if answer in SHAPES:
            confusions[(answer, predicted)] += 1
    print(f"{'accuracy':>8} {'n':>5}  template")
    for name, (hits, n) in sorted(per_template.items(), key=lambda kv: kv[1][0] / kv[1][1]):
        print(f"{hits / n:8.3f} {n:5d}  {name}")
    print("shape answers (truth -> answer: count):", ", ".join(
        f"{truth} -> {said or repr(said)}: {n}" for (truth, said), n in confusions.most_common()))


if __name__ == "__main__":
    main()
