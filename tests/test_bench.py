"""The benchmark scripts run end to end at tiny sizes and end with the JSON they promise.

Speed targets are not asserted here: they live in bench/RESULTS.md, measured on a quiet machine.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--threads", "1"]


def run_json(args: list[str], timeout: int = 120) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def positive(result: dict, keys: list[str]) -> None:
    for key in keys:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from bench.common import synthetic_data

    return synthetic_data(str(tmp_path_factory.mktemp("bench_data")), n_images=8)


def test_train_throughput_tiny(tiny_data, tiny_clip_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_json(["bench/train_throughput.py", *TINY_MODEL, "--batch_size", "2", "--steps", "1", "--warmup", "1",
                    "--stages", "pretrain,sft", "--settings", "online,cached,cached_max",
                    "--clip_path", str(tiny_clip_dir), "--cache_dir", str(tmp_path / "features"),
                    "--pretrain_data", tiny_data["pretrain_data"], "--sft_data", tiny_data["sft_data"],
                    "--images_path", tiny_data["images_path"], "--peak_n", "256", "--results", str(results)])
    positive(out, ["samples_per_s_online", "samples_per_s_cached", "useful_tokens_per_s_cached", "mfu_cached",
                   "matmul_peak_gflops", "images_per_s_cached"])
    assert out["dtype"] == "float32" and out["batch_size"] == 2
    assert {(r["stage"], r["setting"]) for r in out["runs"]} == {
        (s, k) for s in ("pretrain", "sft") for k in ("online", "cached", "cached_max")}
    for r in out["runs"]:
        assert 0 < r["mfu"] < 1 and r["pad_fraction"] >= 0
    text = results.read_text()
    assert "train_throughput.py" in text and out["command"] in text


def test_generate_tiny(tmp_path):
    out = run_json(["bench/generate.py", *TINY_MODEL, "--new_tokens", "6", "--reps", "1", "--bw_mb", "16"])
    positive(out, ["prefill_ms", "decode_tok_s_cache", "decode_tok_s_nocache", "peak_rss_mb", "weight_bytes",
                   "mem_read_gbs", "decode_bw_fraction", "weight_bytes_per_token"])
    assert out["new_tokens"] == 6 and out["same_tokens_cache_nocache"] is True


def test_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")]).returncode == 0


def test_useful_flops_ignore_padding_and_count_the_head_where_supervised():
    sys.path.insert(0, str(ROOT))
    from bench.train_throughput import useful_flops

    cfg = tiny_config()
    d, L, kv, f, V, v = 64, 2, 2 * 16, cfg.ffn_hidden_dim, 6400, 64
    P = L * (2 * d * d + 2 * d * kv + 3 * d * f)
    expected = 6 * P * 30 + 6 * L * d * 30 * 31 + 6 * d * V * 5 + 4 * v * d * 50
    assert useful_flops(cfg, [30], supervised=5, images=1) == expected
    # two rows: attention is per row (not over the padded batch)
    assert useful_flops(cfg, [30, 10], 5, 2) == expected + 6 * P * 10 + 6 * L * d * 10 * 11 + 4 * v * d * 50


def test_results_block_is_replaced_not_duplicated(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.common import write_results

    info = {"machine": "Test CPU", "device": "cpu", "threads": 1, "torch": "x", "commit": "abc", "date": "d"}
    path = tmp_path / "R.md"
    write_results(str(path), info, "t", ["figure", "value"], [["x", 1.5]], "cmd a")
    write_results(str(path), info, "t", ["figure", "value"], [["x", 2.5]], "cmd b")
    write_results(str(path), {**info, "machine": "Other"}, "t", ["figure", "value"], [["x", 3.5]], "cmd c")
    text = path.read_text()
    assert "cmd a" not in text and text.count("cmd b") == 1 and text.count("cmd c") == 1
