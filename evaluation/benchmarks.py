"""POPE and MMStar scores of a trained model, comparable with the figures other small VLMs publish.

Each question is asked with the benchmark's standard prompt (evaluation/benchmark_specs.py) through the same batched
greedy path as the held-out accuracy (evaluation.exact_match.greedy_answers), its answer read as the benchmark reads it
(evaluation/benchmark_scoring.py), and the standard metrics computed. The result, with everything needed to compare
two runs (the checkpoint's fingerprint, the benchmark files' revision and sha256, the prompt, the decoding), is
written to a JSON file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from data_pipeline.records import SkipCounter
from inference.cpu.kernels import current_kernel
from evaluation.exact_match import greedy_answers
from checkpoints.tokenizer import encode, image_placeholder, neutralise_placeholder, render_chat
from checkpoints.files import atomic_write
from data_pipeline.image_decode import ImageError

from .benchmark_data import DUPLICATE, BenchItem, BenchmarkError, count_rows, read_items
from .benchmark_sources import Source, file_sha256
from .benchmark_scoring import PopeScores, mmstar_report, parse_choice, parse_yes_no, pope_report
from .benchmark_specs import BenchmarkSpec
from .images import decode_for_encoder
from inference.chat import VLMChat

DEFAULT_BATCH_SIZE = 32
# how a question is put to each generation's model (the result file's "prompt.chat")
CHAT_NOTE = {"v1": "the v1 chat template; one image placeholder leads the user turn",
             "3v": "the minimind-3v chat template (empty think block); 64 x <|image_pad|> lead the user turn"}


@dataclass
class Answer:
    """One scored question: what was asked about, the truth, the model's words and how they were read."""

    row_id: str
    category: str
    l2_category: str
    truth: str
    answer: str
    parsed: Optional[str]


@dataclass
class BenchRun:
    """The answers of one run, what was skipped, and the scores."""

    spec: BenchmarkSpec
    files: list[str]
    limit: Optional[int]
    rows_read: int = 0
    cut_to_fit: int = 0  # questions whose oldest tokens were cut so that the prompt fits the model's context
    answers: list[Answer] = field(default_factory=list)
    skips: SkipCounter = field(default_factory=SkipCounter)
    scores: dict[str, Any] = field(default_factory=dict)


def _cut_to_fit(chat: VLMChat, prompt: str, ids: list[int]) -> bool:
    """Whether build_prompt had to cut the question: its ids are fewer than those of the whole turn."""
    # the model's own placeholder: v1's 50-token span, 3v's 64 x <|image_pad|>
    content = f"{image_placeholder(chat.generation)}\n" + neutralise_placeholder(prompt, chat.generation)
    return len(ids) < len(encode(chat.tokenizer, render_chat(chat.tokenizer, [{"role": "user", "content": content}])))


def answer_batch(chat: VLMChat, spec: BenchmarkSpec, items: list[BenchItem], run: BenchRun) -> None:
    """Decode the items' images (an undecodable one is a counted skip), ask every question greedily in one batch,
    and read each answer; the results are appended to run.answers in the items' order."""
    good, images = [], []
    for item in items:
        try:
            images.append(decode_for_encoder(chat.encoder, item.image, item.row_id))
            good.append(item)
        except ImageError as e:
            run.skips.skip(item.row_id, f"undecodable image: {str(e).removeprefix(item.row_id + ': ')}")
    if not good:
        return
    features = chat.encoder.encode_images(images, len(images)).to(chat.device)
    prompts = []
    for item in good:
        ids = chat.build_prompt(spec.prompt(item.question), (), 1, reserve=spec.max_new_tokens)
        run.cut_to_fit += _cut_to_fit(chat, spec.prompt(item.question), ids)
        prompts.append(ids)
    # Sorted by length so that the batch needs little padding (left padding with a mask: the same tokens as one
    # question at a time), then put back in file order.
    order = sorted(range(len(good)), key=lambda i: len(prompts[i]))
    replies = greedy_answers(chat.model, [prompts[i] for i in order], features[order], chat.tokenizer,
                             spec.max_new_tokens, chat.device)
    texts = [""] * len(good)
    for i, reply in zip(order, replies):
        texts[i] = reply
    for item, text in zip(good, texts):
        parsed = parse_yes_no(text) if spec.name == "pope" else parse_choice(text, item.options)
        run.answers.append(Answer(item.row_id, item.category, item.l2_category, item.truth, text, parsed))


def score(run: BenchRun) -> dict[str, Any]:
    truths = [a.truth for a in run.answers]
    parsed = [a.parsed for a in run.answers]
    categories = [a.category for a in run.answers]
    if run.spec.name == "pope":
        return pope_report(categories, truths, parsed)
    return mmstar_report(categories, [a.l2_category or "(none)" for a in run.answers], truths, parsed)


@torch.inference_mode()
def run_benchmark(chat: VLMChat, spec: BenchmarkSpec, files: list[str], limit: Optional[int] = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> BenchRun:
    """Ask every question of the files (the first `limit` rows with a limit), batch by batch, and score them.

    Memory stays bounded: one row group's needed columns and one batch of images are held at a time."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    run = BenchRun(spec, files, limit, skips=SkipCounter(source=", ".join(files)))
    total = count_rows(files)
    bar = tqdm(total=total if limit is None else min(total, limit), desc=spec.name, unit="question",
               disable=not progress)
    batch: list[BenchItem] = []
    try:
        for item in read_items(spec, files, run.skips, limit):
            run.rows_read += 1
            if item is None:
                bar.update(1)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                answer_batch(chat, spec, batch, run)
                bar.update(len(batch))
                batch = []
        if batch:
            answer_batch(chat, spec, batch, run)
            bar.update(len(batch))
    finally:
        bar.close()  # an error line then starts on a line of its own
    if not run.answers:
        raise BenchmarkError(nothing_scored(run))
    run.scores = score(run)
    return run


def nothing_scored(run: BenchRun) -> str:
    """The one line that refuses a score over no question: which files, and why each row was not scored."""
    files = run.files[0] + (f" and {len(run.files) - 1} more file(s)" if len(run.files) > 1 else "")
    reasons = "; ".join(f"{n} {reason}" for reason, n in run.skips.counts.most_common(4))
    return (f"{files}: no {run.spec.name} question could be scored ({run.rows_read} row(s) read"
            + (f", {run.skips.total} skipped: {reasons}" if run.skips.total else "") + "); no score to report")


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's saved tensors (name, dtype, shape and bytes, in name order): the same weights give
    the same fingerprint whatever file format they came from. The weights as loaded only: a model converted for
    CPU inference (inference.cpu.prepare: another kernel or int8) no longer holds them, so it is refused."""
    kernel = current_kernel(model)
    if kernel != "default":
        raise ValueError(f"the model runs on the {kernel} CPU kernel: fingerprint its weights before converting them")
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_record(chat: VLMChat, ckpt: str, clip_path: str, stand_in: bool,
                 weights_sha256: Optional[str] = None) -> dict[str, Any]:
    """What identifies the model that answered, and how it ran on the CPU. `weights_sha256` is state_dict_sha256
    of the model as loaded, taken before it was converted for CPU inference (computed here when not given)."""
    config = chat.model.config
    return {"checkpoint": os.path.abspath(ckpt),
            "weights_file_sha256": file_sha256(ckpt) if os.path.isfile(ckpt) else None,
            "state_dict_sha256": weights_sha256 or state_dict_sha256(chat.model),
            "cpu_inference": chat.kernel_line,
            "generation": config.generation, "parameters": chat.n_params, "dim": config.dim,
            "n_layers": config.n_layers,
            "use_moe": bool(getattr(config, "use_moe", False)), "max_seq_len": config.max_seq_len,
            "tokenizer": str(chat.tokenizer_path), "vision_encoder": os.path.abspath(clip_path),
            "vision_encoder_is_untrained_stand_in": stand_in}


def result_record(run: BenchRun, model: dict[str, Any], sources: dict[str, Source]) -> dict[str, Any]:
    """The JSON written after a run: scores, counts, the model, the files (`sources`: each file's repo and
    revision, benchmark_sources.file_sources, read before the run) and how questions were asked."""
    spec = run.spec
    files = []
    for path in run.files:
        source = sources.get(path)
        files.append({"path": os.path.abspath(path), "sha256": file_sha256(path),
                      "repo": source["repo"] if source else None,
                      "revision": source["revision"] if source else None})
    return {
        "benchmark": spec.name, "scores": run.scores, "chance": spec.chance,
        "questions": {"rows_read": run.rows_read, "scored": len(run.answers), "skipped": run.skips.total,
                      "skipped_by_reason": dict(run.skips.counts), "cut_to_fit_context": run.cut_to_fit,
                      "limit": run.limit},
        "model": model,
        "benchmark_files": files, "download_pin": {"repo": spec.repo, "revision": spec.revision},
        "prompt": {"template": spec.prompt("{question}"), "source": spec.prompt_source,
                   "chat": CHAT_NOTE[model.get("generation", "v1")]},
        "decoding": {"greedy": True, "max_new_tokens": spec.max_new_tokens},
        "answers": [vars(a) for a in run.answers],
    }


def write_result(record: dict[str, Any], path: str) -> None:
    """The record as JSON, written atomically (checkpoints.files.atomic_write: never over a directory or a
    special file such as a FIFO or /dev/null)."""
    text = json.dumps(record, ensure_ascii=False, indent=1).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))


def _show(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_lines(run: BenchRun) -> list[str]:
    """What is printed after a run: the headline figure, then one line per split or category."""
    scores, spec = run.scores, run.spec
    counts = (f"n={len(run.answers)}, unparseable {scores['overall']['unparseable']}, skipped {run.skips.total}"
              + (f", cut to fit the context {run.cut_to_fit}" if run.cut_to_fit else ""))
    if spec.name == "pope":
        lines = [f"pope: F1 {_show(scores['mean_f1_over_splits'])} averaged over {len(scores['splits'])} "
                 f"split(s) ({counts}; chance: {spec.chance})"]
        lines += [PopeScores(**s).line(name) for name, s in scores["splits"].items()]
        lines.append(PopeScores(**scores["overall"]).line("all"))
    else:
        lines = [f"mmstar: accuracy {scores['overall']['accuracy']:.3f} ({counts}; chance: {spec.chance})"]
        lines += [f"  {name}: accuracy {c['accuracy']:.3f} (n={c['n']}, unparseable {c['unparseable']})"
                  for name, c in scores["categories"].items()]
    if run.skips.total:
        lines.append(f"  {run.skips.summary()}")
    if run.skips.counts.get(DUPLICATE):
        lines.append(f"warning: {run.skips.counts[DUPLICATE]} row(s) repeat a question already read (the same "
                     f"category and ids), each scored once: is a copy of a file under --bench_path?")
    return lines
