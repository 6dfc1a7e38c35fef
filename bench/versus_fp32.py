"""bench/generate.py's comparison of a converted model (inference.cpu.prepare's kernels, int8) with the plain fp32
model it came from: decode speed in turns, greedy agreement over a fixed prompt set, and load memory measured
in fresh processes (bench/load_memory.py). The figures are described in bench/generate.py's docstring."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import sync
from model.config import CLIP_DIM, IMAGE_SPECIAL_TOKEN, IMAGE_TOKENS
from checkpoints.tokenizer import render_chat


def timed_generate(model, ids, feats, n: int, use_cache: bool, device) -> tuple[float, float, torch.Tensor]:
    """(seconds to the first token, seconds from the first token to the last, the token ids)."""
    sync(device)
    out = []
    t0 = time.perf_counter()
    t_first = t0
    for i, tok in enumerate(model.generate_stream(ids, feats, max_new_tokens=n, temperature=0.0,
                                                   use_cache=use_cache)):
        out.append(tok)
        if i == 0:
            sync(device)
            t_first = time.perf_counter()
    sync(device)
    t_end = time.perf_counter()
    return t_first - t0, t_end - t_first, torch.stack(out, 1)



def prompt_ids(tokenizer, question: str, device) -> torch.Tensor:
    """The chat prompt asking `question` about one image (its 50-token placeholder first)."""
    text = render_chat(tokenizer, [{"role": "user", "content": IMAGE_SPECIAL_TOKEN + "\n" + question}])
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)


AGREEMENT_QUESTIONS = ("Describe the image in detail.", "What colour is the largest object?",
                       "How many people are in the picture?", "What is written on the sign?", "Is it day or night?",
                       "这个图片描述的是什么内容？", "What is the animal doing?",
                       "Where could this photo have been taken?")


def time_against_reference(model, reference, ids, feats, n: int, reps: int, device) -> dict[str, Any]:
    """The converted model and the plain fp32 reference decoding in turns: best seconds of the model, the
    reference's tok/s, the ratio of the two bests, and whether their greedy tokens are the same."""
    timed_generate(reference, ids, feats, min(n, 8), True, device)  # warm-up
    best, best_ref, tokens, ref_tokens, ratios = float("inf"), float("inf"), None, None, []
    for rep in range(reps):
        # the two take turns, each going first in every other rep (neither always runs after the other)
        for turn in ((model, reference) if rep % 2 == 0 else (reference, model)):
            _, t_rest, out = timed_generate(turn, ids, feats, n, True, device)
            if turn is model:
                best, tokens, t_model = min(best, t_rest), out, t_rest
            else:
                best_ref, ref_tokens, t_ref = min(best_ref, t_rest), out, t_rest
        ratios.append(t_ref / t_model)
    return {"best_cache_s": best, "decode_tok_s_fp32": (n - 1) / best_ref if n > 1 else float("nan"),
            "speedup_vs_fp32": best_ref / best, "median_speedup_vs_fp32": statistics.median(ratios),
            "faster_reps_vs_fp32": f"{sum(r > 1 for r in ratios)}/{reps}",
            "same_tokens_fp32": bool(torch.equal(tokens, ref_tokens))}


def agreement(model, reference, tokenizer, device, n_prompts: int, n_tokens: int) -> dict[str, Any]:
    """How often the converted model's greedy choice is the reference's over n_prompts prompts (see above)."""
    ranked_first = total = same_answers = 0
    for i in range(n_prompts):
        ids = prompt_ids(tokenizer, AGREEMENT_QUESTIONS[i % len(AGREEMENT_QUESTIONS)], device)
        feats = torch.randn(1, IMAGE_TOKENS, CLIP_DIM, generator=torch.Generator().manual_seed(i)).to(device)
        ref = reference.generate(ids, feats, max_new_tokens=n_tokens, temperature=0.0)
        same_answers += bool(torch.equal(model.generate(ids, feats, max_new_tokens=n_tokens, temperature=0.0), ref))
        with torch.inference_mode():  # the reference's answer so far as context: one forward, every position
            logits = model(torch.cat([ids, ref[:, :-1]], dim=1), feats).logits[0, ids.shape[1] - 1:]
        ranked_first += int((logits.argmax(-1) == ref[0]).sum())
        total += ref.shape[1]
    return {"token_agreement_fp32": ranked_first / total, "same_answers_fp32": same_answers / n_prompts,
            "agreement_prompts": n_prompts}


def load_memory(reference, args: argparse.Namespace) -> dict[str, Any]:
    """bench/load_memory.py in fresh processes on the same weights: plain fp32, then converted as in this run."""
    from checkpoints.checkpoint import save_checkpoint
    from checkpoints.tokenizer import tokenizer_record

    def measure(ckpt: str, flags: list[str]) -> dict[str, Any]:
        cmd = [sys.executable, str(Path(__file__).with_name("load_memory.py")), ckpt, *flags]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/load_memory.py failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if not ckpt:
            ckpt = os.path.join(tmp, "bench.pth")
            save_checkpoint(reference, ckpt, tokenizer=tokenizer_record(args.tokenizer_path))
        plain = measure(ckpt, ["--cpu_kernel", "default"])
        converted = measure(ckpt, ["--quantize", args.quantize, "--cpu_kernel", args.kernel])
    return {"load_peak_rss_mb": converted["peak_rss_mb"], "load_rss_mb": converted["rss_mb"],
            "load_peak_rss_mb_fp32": plain["peak_rss_mb"], "load_rss_mb_fp32": plain["rss_mb"]}


def compare_with_reference(model, reference, tokenizer, ids, feats, args, device) -> dict[str, Any]:
    """Every figure of the converted model against the plain fp32 reference (None when nothing is converted)."""
    keys = ["decode_tok_s_fp32", "speedup_vs_fp32", "median_speedup_vs_fp32", "faster_reps_vs_fp32",
            "same_tokens_fp32", "token_agreement_fp32", "same_answers_fp32", "agreement_prompts", "load_peak_rss_mb",
            "load_rss_mb", "load_peak_rss_mb_fp32", "load_rss_mb_fp32"]
    out: dict[str, Any] = dict.fromkeys(keys)
    if reference is None:
        return out
    out.update(time_against_reference(model, reference, ids, feats, args.new_tokens, args.reps, device))
    out.update(agreement(model, reference, tokenizer, device, args.agree_prompts, args.agree_tokens))
    if device.type == "cpu" and reference.output.weight.dtype == torch.float32:
        out.update(load_memory(reference, args))
    return out
