"""Throughput of serve_openai_api.py under 1, 4 and 16 concurrent clients, with and without dynamic batching.

The server runs as a real process (random weights at --dim/--n_layers, the 1-layer stand-in CLIP, built into
.cache/bench if missing) and is driven over HTTP. Each client sends --requests_per_client chat requests one
after another; requests are greedy with max_tokens --max_tokens, text-only, questions of different lengths
(so batches really need padding). For each --max_batch setting (default: 1 = no batching, and 8) and each
concurrency level:
  requests_per_s      completed requests / wall time of the level
  tokens_per_s        completion tokens (from each response's usage) / wall time
  mean_latency_s      mean time from sending a request to its full response
The last printed line is JSON with every measurement.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (CACHE_DIR, ROOT, bench_title, command_line, emit, machine_info, resolve_size,  # noqa: E402
                          write_results)
from trainer.config import add_model_size_args, model_size  # noqa: E402

QUESTIONS = ["Hi", "What is the capital of the moon?", "Describe a quiet morning in a small village by the sea.",
             "List three colours.", "Tell me a long story about a small robot who learns to paint with a cat."]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    add_model_size_args(p)  # the trainer's size flags: --preset (default minimind-v-small), --dim, ...
    a("--clients", default="1,4,16", help="comma-separated concurrency levels")
    a("--max_batch", default="1,8", help="comma-separated --max_batch settings of the server")
    a("--batch_wait_ms", type=float, default=10.0)
    a("--requests_per_client", type=int, default=2)
    a("--max_tokens", type=int, default=32)
    a("--threads", type=int, default=None, help="torch threads of the server process")
    a("--results", default="", help="write the table into this markdown file (e.g. bench/RESULTS.md)")
    return p


def start_server(ckpt: str, clip: str, max_batch: int, wait_ms: float, threads: Optional[int],
                 log_path: str) -> tuple[subprocess.Popen, str]:
    import httpx

    from tests.helpers import free_port

    port = free_port()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve_openai_api.py"), "--ckpt", ckpt, "--clip_path", clip,
                             "--port", str(port), "--max_batch", str(max_batch), "--batch_wait_ms", str(wait_ms),
                             "--model_name", "bench", "--log_level", "warning"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}: see {log_path}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit("server did not become healthy within 180 s")


def run_level(base: str, clients: int, per_client: int, max_tokens: int) -> dict[str, float]:
    import httpx

    def client(c: int) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):
                question = QUESTIONS[(c + i) % len(QUESTIONS)]
                body = {"model": "bench", "messages": [{"role": "user", "content": question}],
                        "temperature": 0, "max_tokens": max_tokens}
                t0 = time.perf_counter()
                r = http.post(f"{base}/v1/chat/completions", json=body)
                r.raise_for_status()
                out.append((time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for per in pool.map(client, range(clients)) for x in per]
    wall = time.perf_counter() - start
    return {"requests_per_s": len(results) / wall, "tokens_per_s": sum(t for _, t in results) / wall,
            "mean_latency_s": sum(s for s, _ in results) / len(results), "requests": len(results),
            "wall_s": wall}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = resolve_size(build_parser().parse_args(argv))
    os.chdir(ROOT)
    from checkpoints.checkpoint import save_checkpoint
    from model.config import LMConfig
    from checkpoints.tokenizer import DEFAULT_TOKENIZER_PATH, image_token_ids, load_tokenizer, tokenizer_record
    from model.vlm import MiniMindVLM
    from scripts.build_stand_in_clip import build_stand_in_clip

    info = machine_info(torch.device("cpu"))
    clip = CACHE_DIR / "clip_b32_1l"
    if not (clip / "config.json").exists():
        build_stand_in_clip(str(clip), layers=1)
    levels = [int(c) for c in args.clients.split(",")]
    batches = [int(b) for b in args.max_batch.split(",")]
    measured: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(DEFAULT_TOKENIZER_PATH)
        config = LMConfig(**model_size(args), image_ids=image_token_ids(tokenizer))
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, "bench.pth")
        save_checkpoint(MiniMindVLM(config), ckpt, tokenizer=tokenizer_record(DEFAULT_TOKENIZER_PATH))
        for max_batch in batches:
            proc, base = start_server(ckpt, str(clip), max_batch, args.batch_wait_ms, args.threads,
                                      os.path.join(tmp, f"server_{max_batch}.log"))
            try:
                run_level(base, 1, 1, 4)  # warm-up
                for clients in levels:
                    row = {"max_batch": max_batch, "clients": clients,
                           **run_level(base, clients, args.requests_per_client, args.max_tokens)}
                    measured.append(row)
                    print(f"max_batch {max_batch:2d} | {clients:2d} clients | {row['requests']} requests | "
                          f"{row['requests_per_s']:.2f} req/s | {row['tokens_per_s']:.1f} tok/s | "
                          f"mean latency {row['mean_latency_s']:.2f} s", flush=True)
            finally:
                proc.kill()
                proc.wait(timeout=30)
    result = {"model": f"{args.dim}/{args.n_layers}", "max_tokens": args.max_tokens, "measurements": measured,
              **info, "command": command_line()}
    if args.results:
        rows = [[m["max_batch"], m["clients"], m["requests"], m["requests_per_s"], m["tokens_per_s"],
                 m["mean_latency_s"]] for m in measured]
        write_results(args.results, info, bench_title(torch.device("cpu")),
                      ["max_batch", "clients", "requests", "req/s", "completion tok/s", "mean latency s"], rows,
                      result["command"])
    emit(result)
    return result


if __name__ == "__main__":
    main()
