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
  hf_slowdown         decode_tok_s_cache / decode_tok_s_hf (1.0 = as fast as the native path)
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

from bench.common import (  # noqa: E402
    bench_title, command_line, DTYPES, machine_info, peak_memory_mb, read_bandwidth, report,
    start, sync)
from model.LMConfig import CLIP_DIM, IMAGE_SPECIAL_TOKEN, IMAGE_TOKENS, LMConfig  # noqa: E402
from model.model import KVCache, MiniMindVLM  # noqa: E402
from model.tokenizer_utils import DEFAULT_TOKENIZER_PATH, image_token_ids, load_tokenizer, render_chat  # noqa: E402
from model.train_config import add_model_size_args, model_size  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--new_tokens", type=int, default=200)
    a("--device", default="cpu")
    a("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    add_model_size_args(p)  # the trainer's size flags: --preset (default minimind-v-small), --dim, ...
    a("--tokenizer_path", default=DEFAULT_TOKENIZER_PATH)
    a("--prompt", default="Describe the image in detail.")
    a("--reps", type=int, default=3, help="best-of repetitions (prefill, decode with cache)")
    a("--bw_mb", type=int, default=1024, help="size of the tensor summed for the read bandwidth")
    a("--threads", type=int, default=None)
    a("--compile", action="store_true", help="torch.compile the model's forward (dynamic shapes)")
    a("--skip_nocache", action="store_true")
    a("--hf", action="store_true", help="also time the transformers export's generate() (see above)")
    a("--seed", type=int, default=0)
    a("--results", default="", help="write this run's table into this markdown file (e.g. bench/RESULTS.md)")
    a("--name", default="", help="label of this measurement in the JSON line (gpu.sh)")
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

    hf_logging.disable_progress_bar()
    save_checkpoint(model.float(), os.path.join(tmp, "bench.pth"))
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

    params = {id(p): p for p in model.parameters()}.values()
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    per_token = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    per_token += sum(p.numel() * p.element_size() for p in model.norm.parameters())
    per_token += model.output.weight.numel() * model.output.weight.element_size()

    # prefill: the prompt with its image into a fresh cache
    prefill = float("inf")
    with torch.inference_mode():
        for _ in range(args.reps + 1):
            cache = KVCache(config, 1, ids.shape[1] + n, device, dtype)
            sync(device)
            t0 = time.perf_counter()
            model(ids, feats, cache=cache, last_only=True)
            sync(device)
            prefill = min(prefill, time.perf_counter() - t0)

    # decode with the KV cache: best-of reps (the first run also warms up)
    timed_generate(model, ids, feats, min(n, 8), True, device)
    best_cache, tokens_cache, first_ms = float("inf"), None, 0.0
    for _ in range(args.reps):
        t_first, t_rest, tokens_cache = timed_generate(model, ids, feats, n, True, device)
        if t_rest < best_cache:
            best_cache, first_ms = t_rest, 1000 * t_first
    decode_cache = (n - 1) / best_cache if n > 1 else float("nan")

    decode_nocache, same = None, None
    if not args.skip_nocache:
        timed_generate(model, ids, feats, min(n, 4), False, device)
        _, t_rest, tokens_nocache = timed_generate(model, ids, feats, n, False, device)
        decode_nocache = (n - 1) / t_rest if n > 1 else float("nan")
        same = bool(torch.equal(tokens_cache, tokens_nocache))
    peak_mb = peak_memory_mb(device)

    decode_hf, same_hf = None, None
    if args.hf:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            hf = load_hf_export(model, args.tokenizer_path, args.dtype, tmp).to(device)
            model.to(device, dtype)
            with torch.inference_mode():
                timed_hf_generate(hf, ids, feats, min(n, 8), device)  # warm-up
                best_hf, tokens_hf = float("inf"), []
                # alternate with the native path, so that both see the same machine load
                for _ in range(args.reps):
                    t_rest, tokens_hf = timed_hf_generate(hf, ids, feats, n, device)
                    best_hf = min(best_hf, t_rest)
                    best_cache = min(best_cache, timed_generate(model, ids, feats, n, True, device)[1])
        decode_hf = (n - 1) / best_hf if n > 1 else float("nan")
        decode_cache = (n - 1) / best_cache if n > 1 else float("nan")
        same_hf = tokens_hf == tokens_cache[0].tolist()

    bw = read_bandwidth(device, args.bw_mb << 20)
    result: dict[str, Any] = {
        "name": args.name or f"decode {args.dim}/{args.n_layers} {args.dtype}",
        "prefill_ms": 1000 * prefill, "prompt_tokens": ids.shape[1], "first_token_ms": first_ms,
        "decode_tok_s_cache": decode_cache, "decode_tok_s_nocache": decode_nocache,
        "cache_speedup": decode_cache / decode_nocache if decode_nocache else None,
        "peak_rss_mb": peak_mb, "weight_bytes": weight_bytes, "weight_bytes_per_token": per_token,
        "mem_read_gbs": bw / 1e9, "decode_bw_fraction": decode_cache * per_token / bw,
        "new_tokens": n, "same_tokens_cache_nocache": same, "dtype": args.dtype, "compile": args.compile,
        "decode_tok_s_hf": decode_hf, "hf_slowdown": decode_cache / decode_hf if decode_hf else None,
        "same_tokens_hf": same_hf,
        "model": f"{args.dim}/{args.n_layers}",
    }
    result.update(info)
    result["command"] = command_line()
    print(f"{info['machine']} | {args.dim}/{args.n_layers} {args.dtype} | prompt {ids.shape[1]} tokens | prefill "
          f"{result['prefill_ms']:.1f} ms | decode {decode_cache:.1f} tok/s with cache, "
          f"{decode_nocache or float('nan'):.1f} without | {per_token / 1e6:.1f} MB weights/token, read bw "
          f"{bw / 1e9:.1f} GB/s -> {100 * result['decode_bw_fraction']:.0f}% | peak {peak_mb:.0f} MB", flush=True)
    if args.hf:
        print(f"transformers generate() of the export: {decode_hf:.1f} tok/s with its DynamicCache, "
              f"{result['hf_slowdown']:.2f}x slower than the native path; same greedy tokens: {same_hf}", flush=True)
    rows = [["prefill (prompt %d tokens incl. 50 image), ms" % ids.shape[1], result["prefill_ms"]],
            ["decode tok/s, KV cache (%d new tokens)" % n, decode_cache],
            ["decode tok/s, no cache", decode_nocache if decode_nocache else "not run"],
            ["KV cache speed-up", result["cache_speedup"] or "not run"],
            ["weights read per decode token, MB", per_token / 1e6],
            ["read bandwidth (sum of %d MB fp32), GB/s" % args.bw_mb, bw / 1e9],
            ["decode_bw_fraction", result["decode_bw_fraction"]],
            ["peak RSS, MB" if device.type == "cpu" else "peak GPU memory, MB", peak_mb]]
    if args.hf:
        rows += [["transformers generate() of the export, decode tok/s (DynamicCache)", decode_hf],
                 ["native / transformers decode tok/s", result["hf_slowdown"]],
                 ["same greedy tokens as native", same_hf]]
    return report(args.results, info, bench_title(device), ["figure", "value"], rows, "", result)


if __name__ == "__main__":
    main()
