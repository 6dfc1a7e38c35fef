"""Reading a model's answer to a benchmark question, and the benchmarks' standard metrics.

POPE: the answer is read as yes or no from its first word; "yes" is the positive class (as in the original POPE
evaluation). MMStar: the answer is read as an option letter, or as the text of one of the options. An answer that
cannot be read counts as wrong and is counted separately ("unparseable").
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

YES, NO = "yes", "no"
# First words read as yes or no. The published MiniMind-V models were trained mostly on Chinese answers, so the
# plain Chinese yes/no openings count too: 是 (yes, it is), 有 (yes, there is), 否 / 不是 (no),
# 没有 (there is none).
_YES_WORDS = ("yes", "是", "有")
_NO_WORDS = ("no", "否", "不是", "没有")
_LEADING_NOISE = " \t\r\n\"'“”‘’`*([{<"
LETTERS = "ABCD"


def parse_yes_no(answer: str) -> Optional[str]:
    """"yes", "no", or None when the answer does not start with one of them."""
    text = answer.strip(_LEADING_NOISE).lower()
    match = re.match(r"[a-z]+", text)
    if match:
        word = match.group(0)
        return YES if word == "yes" else NO if word == "no" else None
    # a Chinese answer has no spaces: the longest listed opening that starts it wins (没有 before 有)
    for word in sorted(_YES_WORDS + _NO_WORDS, key=len, reverse=True):
        if text.startswith(word):
            return YES if word in _YES_WORDS else NO
    return None


def parse_options(question: str) -> dict[str, str]:
    """The options written into an MMStar question ("...\\nOptions: A: red, B: blue, C: ..."), by letter; empty
    when the question holds no such list."""
    at = question.rfind("Options:")
    if at < 0:
        return {}
    parts = re.split(r"(?:^|,\s*|\n\s*)([A-D])\s*[:：]\s*", question[at + len("Options:"):].strip())
    options = {}
    for letter, text in zip(parts[1::2], parts[2::2]):
        options[letter] = text.strip().rstrip(",").strip()
    return options


def _normalise(text: str) -> str:
    return re.sub(r"[\s.,;:!?。，！？]+", " ", text.lower()).strip()


_LETTER_FORMS = (
    re.compile(r"\(([A-Da-d])\)"),  # "(B)", whatever follows
    re.compile(r"([A-Da-d])(?=\s*$|\s*[.,:;)\]：。，]|\n)"),  # "B", "B.", "B) ...", "b"
    re.compile(r"(?i:option)\s*[:：]?\s*\(?([A-D])\)?(?![A-Za-z])"),  # "Option B"
    re.compile(r"(?i:(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?)\s*[:：]?\s*\(?([A-D])\)?(?![A-Za-z])"),
)


def parse_choice(answer: str, options: dict[str, str]) -> Optional[str]:
    """The option letter an answer picks, or None.

    A letter counts when it is the whole answer or is followed by punctuation ("B", "B.", "(B) a cat", "Option B",
    "The answer is B"); a letter followed by a word ("A dog") does not, since it may be the article. Otherwise an
    answer that starts with exactly one option's text (the longest one, when options share a start) picks it.
    """
    text = answer.strip(" \t\r\n\"'`*")
    for form in _LETTER_FORMS:
        match = form.match(text)
        if match and match.group(1).upper() in (options or LETTERS):
            return match.group(1).upper()
    said = _normalise(text)
    found = [(len(_normalise(t)), letter) for letter, t in options.items()
             if _normalise(t) and (said == _normalise(t) or said.startswith(_normalise(t) + " "))]
    if not found:
        return None
    found.sort(reverse=True)
    if len(found) > 1 and found[0][0] == found[1][0]:
        return None  # two options with the same text: the answer does not say which
    return found[0][1]


def _ratio(num: int, den: int) -> Optional[float]:
    return num / den if den else None


@dataclass
class PopeScores:
    """POPE metrics of one split (or all of them). precision is None when no answer is "yes", recall when no
    question's truth is "yes", f1 when neither happened; yes_ratio is the share of questions answered "yes"."""

    n: int
    accuracy: float
    precision: Optional[float]
    recall: Optional[float]
    f1: Optional[float]
    yes_ratio: float
    unparseable: int
    tp: int
    fp: int
    tn: int
    fn: int

    def line(self, name: str) -> str:
        show = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        return (f"  {name}: accuracy {self.accuracy:.3f}, precision {show(self.precision)}, recall "
                f"{show(self.recall)}, F1 {show(self.f1)}, yes ratio {self.yes_ratio:.3f} (n={self.n}, "
                f"unparseable {self.unparseable})")


def pope_scores(truths: list[str], predictions: list[Optional[str]]) -> PopeScores:
    """Metrics over questions whose truth is "yes"/"no" and whose parsed answer is "yes", "no" or None. An
    unparseable answer is wrong: to a "yes" question it is a miss (lowers recall), and it is never a "yes"."""
    pairs = list(zip(truths, predictions))
    tp = sum(t == YES and p == YES for t, p in pairs)
    fp = sum(t == NO and p == YES for t, p in pairs)
    tn = sum(t == NO and p == NO for t, p in pairs)
    fn = sum(t == YES and p != YES for t, p in pairs)
    n = len(pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    # 2TP / (2TP + FP + FN) is the harmonic mean of precision and recall where both exist, and stays defined (0)
    # when one of them does not but there was a "yes" to find or a wrong "yes" given
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return PopeScores(n, (tp + tn) / n if n else 0.0, precision, recall, f1, (tp + fp) / n if n else 0.0,
                      sum(p is None for p in predictions), tp, fp, tn, fn)


def pope_report(categories: list[str], truths: list[str], predictions: list[Optional[str]]) -> dict:
    """Scores of every split and of all questions, and the F1 averaged over the splits (the figure papers
    usually report for POPE; None when a split's F1 is undefined)."""
    by_split: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(categories):
        by_split[category].append(i)
    splits = {name: pope_scores([truths[i] for i in rows], [predictions[i] for i in rows])
              for name, rows in sorted(by_split.items())}
    f1s = [s.f1 for s in splits.values()]
    mean_f1 = sum(f1s) / len(f1s) if f1s and None not in f1s else None
    return {"overall": asdict(pope_scores(truths, predictions)), "mean_f1_over_splits": mean_f1,
            "splits": {name: asdict(s) for name, s in splits.items()}}


def accuracy_by(groups: Iterable[str], hits: list[bool], unparsed: list[bool]) -> dict[str, dict]:
    """{group: {"n", "accuracy", "unparseable"}} for the rows of each group."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        rows[group].append(i)
    return {name: {"n": len(r), "accuracy": sum(hits[i] for i in r) / len(r),
                   "unparseable": sum(unparsed[i] for i in r)} for name, r in sorted(rows.items())}


def mmstar_report(categories: list[str], l2_categories: list[str], truths: list[str],
                  predictions: list[Optional[str]]) -> dict:
    """Accuracy overall (every question counts once, as MMStar's paper reports it), per category and per
    l2_category."""
    hits = [p == t for t, p in zip(truths, predictions)]
    unparsed = [p is None for p in predictions]
    n = len(hits)
    return {"overall": {"n": n, "accuracy": sum(hits) / n if n else 0.0, "unparseable": sum(unparsed)},
            "categories": accuracy_by(categories, hits, unparsed),
            "l2_categories": accuracy_by(l2_categories, hits, unparsed)}
