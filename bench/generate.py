"""Generation speed of MiniMindVLM at batch 1 with one image: prefill, decode with and without the KV cache.

Model: the 512/8 config (minimind-v-small) with random weights and random image features (speed does not
depend on the values), a chat prompt holding the 50-token image placeholder. Decoding is greedy with no eos
stop, so exactly --new_tokens tokens are produced, through MiniMindVLM.generate_stream (the code path
model/chat.py and the servers use).

  prefill_ms          best-of --reps: the forward over the prompt (image spliced) filling a fresh KV cache,
                      logits at the last position only
  decode_tok_s_cache  (new_tokens - 1) / time from the first token to the last, KV cache on (with --hf, best
                      over the reps above and the reps interleaved with the transformers runs)
  decode_tok_s_nocache  the same with use_cache=False (every step recomputes prompt + image + generated)
  weight_bytes        bytes of all parameters (tied embedding/head counted once)
  weight_bytes_per_token  bytes of weights one decode step reads: the blocks, the norms and the output head
                      (= the tied embedding; the one embedding row looked up is not counted again; the
                      vision projection is not used after prefill). KV-cache reads are not included.
  mem_read_gbs        this machine's read bandwidth, measured in this run: best-of summing a --bw_mb fp32
                      tensor (after the generation runs, so it does not inflate peak_rss_mb)
  decode_bw_fraction  decode_tok_s_cache x weight_bytes_per_token / mem_read_gbs (1.0 = every decode step
                      streams the weights at full read bandwidth)
  peak_rss_mb         peak resident memory of this process (CUDA: peak allocated GPU memory)
With --hf, the same weights are also exported with export_model.py to a temporary directory, loaded back with
AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True), and decoded with transformers' generate()
(greedy, its DynamicCache, same prompt, image and token count):
  decode_tok_s_hf     (new_tokens - 1) / time from the first token to the last (best-of --reps; a streamer
                      timestamps the tokens)
  hf_slowdown         native / transformers decode tok/s, best of the --reps interleaved runs of each
                      (1.0 = as fast as the native path)
  same_tokens_hf      generate() produced exactly the native greedy tokens
The last printed line is JSON with these keys.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (DTYPES, bench_parser, bench_title, command_line, machine_info, peak_memory_mb,  # noqa: E402
                          read_bandwidth, report, start, sync)
from model.config import CLIP_DIM, IMAGE_SPECIAL_TOKEN, IMAGE_TOKENS, LMConfig  # noqa: E402
from model.decoder import KVCache  # noqa: E402
from model.tokenizer import image_token_ids, load_tokenizer, render_chat  # noqa: E402
from model.vlm import MiniMindVLM  # noqa: E402
from trainer.config import model_size  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    a = p.add_argument
    a("--new_tokens", type=int, default=200)
    a("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    a("--prompt", default="Describe the image in detail.")
    a("--reps", type=int, default=3, help="best-of repetitions (prefill, decode with cache)")
    a("--bw_mb", type=int, default=1024, help="size of the tensor summed for the read bandwidth")
    a("--compile", action="store_true", help="torch.compile the model's forward (dynamic shapes)")
    a("--skip_nocache", action="store_true")
    a("--hf", action="store_true", help="also time the transformers export's generate() (see above)")
    return p


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


class _TokenClock:
    """A generate() streamer that timestamps each new token (the first put() is the prompt)."""

    def __init__(self, device):
        self.device, self.times, self.tokens = device, [], []

    def put(self, value: torch.Tensor) -> None:
        if self.times or self.tokens:  # not the prompt
            sync(self.device)
            self.tokens.append(value.reshape(-1)[0].item())
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_hf_export(model, tokenizer_path: str, dtype: str, tmp: str):
    """Export `model` with export_model.py into tmp and load it back as a transformers model."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import export_model
    from model.checkpoint import save_checkpoint
    from model.tokenizer import tokenizer_record

    hf_logging.disable_progress_bar()
    save_checkpoint(model.float(), os.path.join(tmp, "bench.pth"), tokenizer=tokenizer_record(tokenizer_path))
    out = export_model.export(os.path.join(tmp, "bench.pth"), os.path.join(tmp, "hf"), tokenizer_path,
                              dtype=dtype, verify=False)
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=DTYPES[dtype]).eval()


def timed_hf_generate(hf, ids, feats, n: int, device) -> tuple[float, list[int]]:
    """(seconds from the first token to the last, the tokens) for transformers generate()."""
    clock = _TokenClock(device)
    sync(device)
    hf.generate(ids, image_features=feats, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                eos_token_id=None, streamer=clock)
    sync(device)
    return clock.times[-1] - clock.times[1], clock.tokens


def weight_bytes(model: MiniMindVLM) -> tuple[int, int]:
    """(all unique weights, the weights one decode step reads: blocks, final norm, output head), in bytes."""
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    per_token = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    per_token += sum(p.numel() * p.element_size() for p in model.norm.parameters())
    per_token += model.output.weight.numel() * model.output.weight.element_size()
    return total, per_token


def time_prefill(model, config: LMConfig, ids, feats, n: int, reps: int, device, dtype) -> float:
    """Best-of seconds for the prompt with its image into a fresh cache."""
    prefill = float("inf")
    with torch.inference_mode():
        for _ in range(reps + 1):
            cache = KVCache(config, 1, ids.shape[1] + n, device, dtype)
            sync(device)
            t0 = time.perf_counter()
            model(ids, feats, cache=cache, last_only=True)
            sync(device)
            prefill = min(prefill, time.perf_counter() - t0)
    return prefill


def time_decode(model, ids, feats, n: int, args: argparse.Namespace, device) -> dict[str, Any]:
    """Decode with the KV cache (best-of reps; the first run also warms up) and, unless skipped, without it."""
    timed_generate(model, ids, feats, min(n, 8), True, device)
    best, tokens, first_ms = float("inf"), None, 0.0
    for _ in range(args.reps):
        t_first, t_rest, tokens = timed_generate(model, ids, feats, n, True, device)
        if t_rest < best:
            best, first_ms = t_rest, 1000 * t_first
    out = {"best_cache_s": best, "tokens_cache": tokens, "first_token_ms": first_ms, "decode_tok_s_nocache": None,
           "same_tokens_cache_nocache": None}
    if not args.skip_nocache:
        timed_generate(model, ids, feats, min(n, 4), False, device)
        _, t_rest, tokens_nocache = timed_generate(model, ids, feats, n, False, device)
        out["decode_tok_s_nocache"] = (n - 1) / t_rest if n > 1 else float("nan")
        out["same_tokens_cache_nocache"] = bool(torch.equal(tokens, tokens_nocache))
    return out


def time_hf(model, ids, feats, n: int, args: argparse.Namespace, device, dtype, decode: dict[str, Any]) -> dict:
    """transformers generate() of the export, alternated with the native path so both see the same load (the
    native best time in `decode` is updated too)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf_export(model, args.tokenizer_path, args.dtype, tmp).to(device)
        model.to(device, dtype)
        with torch.inference_mode():
            timed_hf_generate(hf, ids, feats, min(n, 8), device)  # warm-up
            best_hf, best_native, tokens_hf = float("inf"), float("inf"), []
            for _ in range(args.reps):
                t_rest, tokens_hf = timed_hf_generate(hf, ids, feats, n, device)
                best_hf = min(best_hf, t_rest)
                best_native = min(best_native, timed_generate(model, ids, feats, n, True, device)[1])
            decode["best_cache_s"] = min(decode["best_cache_s"], best_native)
    # the ratio compares the interleaved runs only: the same number of tries under the same load for both
    return {"decode_tok_s_hf": (n - 1) / best_hf if n > 1 else float("nan"), "hf_slowdown": best_hf / best_native,
            "same_tokens_hf": tokens_hf == decode["tokens_cache"][0].tolist()}


def table_rows(result: dict[str, Any], args: argparse.Namespace, device) -> list[list[Any]]:
    rows = [["prefill (prompt %d tokens incl. 50 image), ms" % result["prompt_tokens"], result["prefill_ms"]],
            ["decode tok/s, KV cache (%d new tokens)" % result["new_tokens"], result["decode_tok_s_cache"]],
            ["decode tok/s, no cache", result["decode_tok_s_nocache"] or "not run"],
            ["KV cache speed-up", result["cache_speedup"] or "not run"],
            ["weights read per decode token, MB", result["weight_bytes_per_token"] / 1e6],
            ["read bandwidth (sum of %d MB fp32), GB/s" % args.bw_mb, result["mem_read_gbs"]],
            ["decode_bw_fraction", result["decode_bw_fraction"]],
            ["peak RSS, MB" if device.type == "cpu" else "peak GPU memory, MB", result["peak_rss_mb"]]]
    if args.hf:
        rows += [["transformers generate() of the export, decode tok/s (DynamicCache)", result["decode_tok_s_hf"]],
                 ["native / transformers decode tok/s", result["hf_slowdown"]],
                 ["same greedy tokens as native", result["same_tokens_hf"]]]
    return rows


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = start(build_parser(), argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = machine_info(device)
    tokenizer = load_tokenizer(args.tokenizer_path)
    config = LMConfig(**model_size(args), image_ids=image_token_ids(tokenizer), vision_dim=CLIP_DIM)
    torch.manual_seed(args.seed)
    model = MiniMindVLM(config).to(device, dtype).eval()
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    text = render_chat(tokenizer, [{"role": "user", "content": IMAGE_SPECIAL_TOKEN + "\n" + args.prompt}])
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
    feats = torch.randn(1, IMAGE_TOKENS, CLIP_DIM, device=device)
    n = args.new_tokens
    total_bytes, per_token = weight_bytes(model)
    prefill = time_prefill(model, config, ids, feats, n, args.reps, device, dtype)
    decode = time_decode(model, ids, feats, n, args, device)
    peak_mb = peak_memory_mb(device)
    hf = time_hf(model, ids, feats, n, args, device, dtype, decode) if args.hf else {"decode_tok_s_hf": None,
                                                                                    "same_tokens_hf": None}
    decode_cache = (n - 1) / decode["best_cache_s"] if n > 1 else float("nan")
    bw = read_bandwidth(device, args.bw_mb << 20)
    nocache, decode_hf = decode["decode_tok_s_nocache"], hf["decode_tok_s_hf"]
    result: dict[str, Any] = {
        "name": args.name or f"decode {args.dim}/{args.n_layers} {args.dtype}",
        "prefill_ms": 1000 * prefill, "prompt_tokens": ids.shape[1], "first_token_ms": decode["first_token_ms"],
        "decode_tok_s_cache": decode_cache, "decode_tok_s_nocache": nocache,
        "cache_speedup": decode_cache / nocache if nocache else None,
        "peak_rss_mb": peak_mb, "weight_bytes": total_bytes, "weight_bytes_per_token": per_token,
        "mem_read_gbs": bw / 1e9, "decode_bw_fraction": decode_cache * per_token / bw,
        "new_tokens": n, "same_tokens_cache_nocache": decode["same_tokens_cache_nocache"], "dtype": args.dtype,
        "compile": args.compile, "decode_tok_s_hf": decode_hf,
        "hf_slowdown": hf.get("hf_slowdown"), "same_tokens_hf": hf["same_tokens_hf"],
        "model": f"{args.dim}/{args.n_layers}",
    }
    result.update(info, command=command_line())
    print(f"{info['machine']} | {args.dim}/{args.n_layers} {args.dtype} | prompt {ids.shape[1]} tokens | prefill "
          f"{result['prefill_ms']:.1f} ms | decode {decode_cache:.1f} tok/s with cache, "
          f"{nocache or float('nan'):.1f} without | {per_token / 1e6:.1f} MB weights/token, read bw "
          f"{bw / 1e9:.1f} GB/s -> {100 * result['decode_bw_fraction']:.0f}% | peak {peak_mb:.0f} MB", flush=True)
    if args.hf:
        print(f"transformers generate() of the export: {decode_hf:.1f} tok/s with its DynamicCache, "
              f"{result['hf_slowdown']:.2f}x slower than the native path; same greedy tokens: "
              f"{hf['same_tokens_hf']}", flush=True)
    return report(args.results, info, bench_title(device), ["figure", "value"], table_rows(result, args, device), "",
                  result)


if __name__ == "__main__":
    main()
