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
(greedy, its DynamicCache, same prompt, image and token count; with --kernel, against the native model on that
kernel, the export made from the plain copy):
  decode_tok_s_hf     (new_tokens - 1) / time from the first token to the last (best-of --reps; a streamer
                      timestamps the tokens)
  hf_slowdown         native / transformers decode tok/s, best of the --reps interleaved runs of each
                      (1.0 = as fast as the native path)
  same_tokens_hf      generate() produced exactly the native greedy tokens
With --kernel (--cpu_kernel's values: auto, compiled, bf16, int8; docs/cpu_inference.md) or --quantize int8, the
model is converted after a plain fp32 copy is set aside as the reference (peak_rss_mb then holds both), so one run
compares the kernel with default, and:
  kernel              the path used (default, transposed, onednn, onednn_bf16, compiled or int8); kernel_line says why
  decode_tok_s_fp32   the plain fp32 reference's decode tok/s, timed in turns with the converted model's reps
  speedup_vs_fp32     decode_tok_s_cache / decode_tok_s_fp32 over those interleaved reps
  median_speedup_vs_fp32  the median over those reps of the reference's time / the converted model's
  faster_reps_vs_fp32 in how many of those reps the converted model decoded faster than the reference
  same_tokens_fp32    the timed prompt's greedy tokens equal the reference's
  token_agreement_fp32  over --agree_prompts prompts (fixed questions, one seeded random image each): share of
                      the reference's --agree_tokens greedy tokens that the converted model also ranks first
                      when fed the reference's answer so far (no drift after a first difference)
  same_answers_fp32   share of those prompts whose whole greedy answer is identical
  fp32_bw_fraction    decode_tok_s_cache x the fp32 weight_bytes_per_token / mem_read_gbs: the speed against
                      what fp32 weights allow (above 1.0 only a path reading fewer bytes can go)
  load_peak_rss_mb, load_rss_mb (and _fp32): peak and final resident memory of a separate process loading the
                      model from a checkpoint and converting it as the apps do (bench/load_memory.py)
--ckpt loads trained weights instead of random ones (the agreement of a trained model is the one that matters).
The last printed line is JSON with these keys.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (DTYPES, bench_parser, bench_title, command_line, machine_info, peak_memory_mb,  # noqa: E402
                          read_bandwidth, report, start, sync)
from model.config import CLIP_DIM, IMAGE_TOKENS, LMConfig  # noqa: E402
from inference.cpu.prepare import ACCEPTED, QUANTIZE_CHOICES, kernel_name, prepare_for_cpu_inference  # noqa: E402
from inference.cpu.kernels import current_kernel, decode_linears, linear_nbytes  # noqa: E402
from bench.versus_fp32 import compare_with_reference, prompt_ids, timed_generate  # noqa: E402
from model.decoder import KVCache  # noqa: E402
from checkpoints.tokenizer import image_token_ids, load_tokenizer  # noqa: E402
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
    a("--kernel", default="default", type=kernel_name, choices=ACCEPTED,
      help="CPU kernel, as the apps' --cpu_kernel (inference.cpu.prepare); against a plain fp32 copy in the same run")
    a("--quantize", default="none", choices=QUANTIZE_CHOICES, help="int8: quantise the decoder's linears")
    a("--agree_prompts", type=int, default=8, help="prompts of the agreement with the fp32 reference")
    a("--agree_tokens", type=int, default=32, help="greedy tokens per agreement prompt")
    a("--ckpt", default="", help="trained weights to load instead of random ones (their config sets the size)")
    return p


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
    from checkpoints.checkpoint import save_checkpoint
    from checkpoints.tokenizer import tokenizer_record

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
    """(all unique weights, the weights one decode step reads: blocks, final norm, output head), in bytes.
    A linear converted for a CPU kernel or to int8 counts the bytes it holds (the tied head then has its own)."""
    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())

    converted = [linear for _, _, linear in decode_linears(model) if not isinstance(linear, torch.nn.Linear)]
    total = size(model.parameters()) + sum(linear_nbytes(linear) for linear in converted)
    linears = {id(p) for _, _, linear in decode_linears(model) for p in linear.parameters()}
    per_token = size(p for p in model.layers.parameters() if id(p) not in linears) + size(model.norm.parameters())
    per_token += sum(linear_nbytes(linear) for _, _, linear in decode_linears(model))
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


def time_hf(model, ids, feats, n: int, args: argparse.Namespace, device, dtype, decode: dict[str, Any],
            plain=None) -> dict:
    """transformers generate() of the export, alternated with the native path so both see the same load (the
    native best time in `decode` is updated too). `plain`: the unconverted copy to export when --kernel converted
    `model` (the native side then runs that kernel)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf_export(model if plain is None else plain, args.tokenizer_path, args.dtype, tmp).to(device)
        if plain is None:
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


def converting(args: argparse.Namespace) -> bool:
    return args.kernel != "default" or args.quantize != "none"


def build_model(args: argparse.Namespace, tokenizer, device, dtype) -> MiniMindVLM:
    """Random weights of the --preset/--dim size (seeded), or the trained ones of --ckpt."""
    if args.ckpt:
        from checkpoints.checkpoint import load_model

        return load_model(args.ckpt, image_ids=image_token_ids(tokenizer), device=device).to(device, dtype).eval()
    config = LMConfig(**model_size(args), image_ids=image_token_ids(tokenizer), vision_dim=CLIP_DIM)
    torch.manual_seed(args.seed)
    return MiniMindVLM(config).to(device, dtype).eval()


def table_rows(result: dict[str, Any], args: argparse.Namespace, device) -> list[list[Any]]:
    rows = [["CPU kernel of the decoder's linears", result["kernel"]],
            ["prefill (prompt %d tokens incl. 50 image), ms" % result["prompt_tokens"], result["prefill_ms"]],
            ["decode tok/s, KV cache (%d new tokens)" % result["new_tokens"], result["decode_tok_s_cache"]],
            ["decode tok/s, no cache", result["decode_tok_s_nocache"] or "not run"],
            ["KV cache speed-up", result["cache_speedup"] or "not run"],
            ["weights read per decode token, MB", result["weight_bytes_per_token"] / 1e6],
            ["read bandwidth (sum of %d MB fp32), GB/s" % args.bw_mb, result["mem_read_gbs"]],
            ["decode_bw_fraction", result["decode_bw_fraction"]],
            ["peak RSS, MB" if device.type == "cpu" else "peak GPU memory, MB", result["peak_rss_mb"]]]
    if result["decode_tok_s_fp32"] is not None:
        rows += [["plain fp32 decode tok/s (interleaved reference)", result["decode_tok_s_fp32"]],
                 ["speed-up over plain fp32", result["speedup_vs_fp32"]],
                 ["median speed-up over plain fp32, rep by rep", result["median_speedup_vs_fp32"]],
                 ["reps decoded faster than plain fp32", result["faster_reps_vs_fp32"]],
                 ["fp32_bw_fraction (fp32 weight bytes per token)", result["fp32_bw_fraction"]],
                 ["same greedy tokens as fp32 (timed prompt)", result["same_tokens_fp32"]],
                 [f"tokens ranked first as fp32 does ({result['agreement_prompts']} prompts x "
                  f"{args.agree_tokens})", result["token_agreement_fp32"]],
                 ["identical greedy answers", result["same_answers_fp32"]]]
    if result["load_peak_rss_mb"] is not None:
        rows += [["load + convert: peak / final RSS, MB", f"{result['load_peak_rss_mb']:.0f} / "
                                                          f"{result['load_rss_mb']:.0f}"],
                 ["load plain fp32: peak / final RSS, MB", f"{result['load_peak_rss_mb_fp32']:.0f} / "
                                                           f"{result['load_rss_mb_fp32']:.0f}"]]
    if args.hf:
        rows += [["transformers generate() of the export, decode tok/s (DynamicCache)", result["decode_tok_s_hf"]],
                 ["native / transformers decode tok/s", result["hf_slowdown"]],
                 ["same greedy tokens as native", result["same_tokens_hf"]]]
    return rows


def print_summary(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"{result['machine']} | {result['model']} {args.dtype} | kernel {result['kernel']} | prompt "
          f"{result['prompt_tokens']} tokens | prefill {result['prefill_ms']:.1f} ms | decode "
          f"{result['decode_tok_s_cache']:.1f} tok/s with cache, {result['decode_tok_s_nocache'] or float('nan'):.1f} "
          f"without | {result['weight_bytes_per_token'] / 1e6:.1f} MB weights/token, read bw "
          f"{result['mem_read_gbs']:.1f} GB/s -> {100 * result['decode_bw_fraction']:.0f}% | peak "
          f"{result['peak_rss_mb']:.0f} MB", flush=True)
    if result["decode_tok_s_fp32"] is not None:
        print(f"against plain fp32: {result['decode_tok_s_fp32']:.1f} tok/s, speed-up {result['speedup_vs_fp32']:.2f}x "
              f"(median rep by rep {result['median_speedup_vs_fp32']:.2f}x, faster in {result['faster_reps_vs_fp32']} "
              f"reps) "
              f"({100 * result['fp32_bw_fraction']:.0f}% of read bw in fp32 bytes); greedy tokens ranked first as "
              f"fp32: {100 * result['token_agreement_fp32']:.1f}%, identical answers "
              f"{100 * result['same_answers_fp32']:.0f}% of {result['agreement_prompts']} prompts", flush=True)
    if result["load_peak_rss_mb"] is not None:
        print(f"load + convert: peak {result['load_peak_rss_mb']:.0f} MB, then {result['load_rss_mb']:.0f} MB "
              f"(plain fp32: peak {result['load_peak_rss_mb_fp32']:.0f} MB, then "
              f"{result['load_rss_mb_fp32']:.0f} MB)", flush=True)
    if args.hf:
        print(f"transformers generate() of the export: {result['decode_tok_s_hf']:.1f} tok/s with its DynamicCache, "
              f"{result['hf_slowdown']:.2f}x slower than the native path; same greedy tokens: "
              f"{result['same_tokens_hf']}", flush=True)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = build_parser()
    args = start(parser, argv)
    if args.hf and args.quantize != "none":
        parser.error("--hf times the fp32 model against transformers; run it without --quantize")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = machine_info(device)
    tokenizer = load_tokenizer(args.tokenizer_path)
    model = build_model(args, tokenizer, device, dtype)
    config, n = model.config, args.new_tokens
    fp32_per_token = weight_bytes(model)[1]
    reference = copy.deepcopy(model) if converting(args) else None
    try:
        kernel_line = prepare_for_cpu_inference(model, args.quantize, args.kernel)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(kernel_line, flush=True)
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    ids = prompt_ids(tokenizer, args.prompt, device)
    feats = torch.randn(1, IMAGE_TOKENS, CLIP_DIM, device=device)
    total_bytes, per_token = weight_bytes(model)
    prefill = time_prefill(model, config, ids, feats, n, args.reps, device, dtype)
    decode = time_decode(model, ids, feats, n, args, device)
    versus = compare_with_reference(model, reference, tokenizer, ids, feats, args, device)
    decode["best_cache_s"] = min(decode["best_cache_s"], versus.pop("best_cache_s", float("inf")))
    peak_mb = peak_memory_mb(device)
    hf = time_hf(model, ids, feats, n, args, device, dtype, decode, reference) if args.hf else {"decode_tok_s_hf": None,
                                                                                    "same_tokens_hf": None}
    decode_cache = (n - 1) / decode["best_cache_s"] if n > 1 else float("nan")
    bw = read_bandwidth(device, args.bw_mb << 20)
    nocache = decode["decode_tok_s_nocache"]
    result: dict[str, Any] = {
        "name": args.name or f"decode {config.dim}/{config.n_layers} {args.dtype}",
        "prefill_ms": 1000 * prefill, "prompt_tokens": ids.shape[1], "first_token_ms": decode["first_token_ms"],
        "decode_tok_s_cache": decode_cache, "decode_tok_s_nocache": nocache,
        "cache_speedup": decode_cache / nocache if nocache else None,
        "peak_rss_mb": peak_mb, "weight_bytes": total_bytes, "weight_bytes_per_token": per_token,
        "mem_read_gbs": bw / 1e9, "decode_bw_fraction": decode_cache * per_token / bw,
        "new_tokens": n, "same_tokens_cache_nocache": decode["same_tokens_cache_nocache"], "dtype": args.dtype,
        "compile": args.compile, "decode_tok_s_hf": hf["decode_tok_s_hf"],
        "hf_slowdown": hf.get("hf_slowdown"), "same_tokens_hf": hf["same_tokens_hf"],
        "model": f"{config.dim}/{config.n_layers}", "kernel": current_kernel(model), "kernel_line": kernel_line,
        "quantize": args.quantize, "fp32_weight_bytes_per_token": fp32_per_token,
        "fp32_bw_fraction": decode_cache * fp32_per_token / bw, **versus,
    }
    result.update(info, command=command_line())
    print_summary(result, args)
    return report(args.results, info, bench_title(device), ["figure", "value"], table_rows(result, args, device), "",
                  result)


if __name__ == "__main__":
    main()
