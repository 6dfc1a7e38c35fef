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


def test_generate_hf_tiny():
    out = run_json(["bench/generate.py", *TINY_MODEL, "--new_tokens", "6", "--reps", "1", "--bw_mb", "16",
                    "--skip_nocache", "--hf"])
    positive(out, ["decode_tok_s_hf", "hf_slowdown"])
    assert out["same_tokens_hf"] is True


@pytest.mark.parametrize("flags", [["--kernel", "auto"], ["--quantize", "int8"]])
def test_generate_against_fp32_tiny(flags):
    out = run_json(["bench/generate.py", *TINY_MODEL, "--new_tokens", "6", "--reps", "1", "--bw_mb", "16",
                    "--skip_nocache", "--agree_prompts", "2", "--agree_tokens", "4", *flags], timeout=300)
    positive(out, ["decode_tok_s_fp32", "speedup_vs_fp32", "fp32_bw_fraction", "load_peak_rss_mb", "load_rss_mb",
                   "load_peak_rss_mb_fp32", "load_rss_mb_fp32"])
    assert out["kernel"] == ("int8" if "int8" in flags else out["kernel_line"].split()[2])
    assert out["agreement_prompts"] == 2 and 0 <= out["token_agreement_fp32"] <= 1
    if "int8" in flags:  # a quarter of the bytes per weight, plus per-row scales
        assert out["weight_bytes_per_token"] < 0.3 * out["fp32_weight_bytes_per_token"]
    else:  # fp32 paths: the same greedy tokens
        assert out["same_tokens_fp32"] is True and out["token_agreement_fp32"] == 1.0


def test_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")]).returncode == 0


def test_train_flops_match_a_hand_count_dense_and_moe():
    """LMConfig.train_flops, the one FLOP model of the trainer's log and the benches, against numbers worked out
    by hand for the tiny config: d 64, 2 layers, kv 2 heads x 16 = 32, SwiGLU width 192, vocab 6400, vision 64."""
    import torch

    from model.vlm import MiniMindVLM

    # per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12,288; SwiGLU 3 x 64 x 192 = 36,864
    dense = tiny_config()
    assert dense.ffn_hidden_dim == 192
    block_weights = 2 * (12_288 + 36_864)  # 98,304
    blocks = MiniMindVLM(dense).layers
    assert sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear)) == block_weights
    # one row of 30 tokens, 5 supervised positions, 1 image:
    #   blocks 6 x 98,304 x 30 = 17,694,720; attention 6 x 2 x 64 x 30 x 31 = 714,240;
    #   head 6 x 64 x 6400 x 5 = 12,288,000; projection 4 x 64 x 64 x 50 = 819,200
    assert dense.train_flops([30], supervised=5, images=1) == 31_516_160
    # a second row of 10 tokens with its image: attention is per row, not over the padded batch
    assert dense.train_flops([30, 10], 5, 2) == 31_516_160 + 6 * 98_304 * 10 + 6 * 2 * 64 * 10 * 11 + 819_200
    # MoE: 2 routed experts per token + the shared one, and the gate (64 x 4 routed experts) per layer:
    #   2 x (12,288 + 3 x 36,864 + 256) = 246,272 active block weights per token
    moe = tiny_config(use_moe=True)
    assert moe.train_flops([30], 5, 1) == 6 * 246_272 * 30 + 714_240 + 12_288_000 + 819_200 == 58_150_400


def test_demo_recipes_multi_turn_regrouping_keeps_every_question(tmp_path):
    """bench/demo_recipes.py's multi-turn records hold each question once, with one <image> at the start."""
    sys.path.insert(0, str(ROOT / "bench"))
    from demo_recipes import multi_turn_sft

    records = [{"id": f"q{i}", "image": f"img_{i % 2}.png", "conversations": [
        {"from": "human", "value": f"<image>\nquestion {i}?"}, {"from": "gpt", "value": f"answer {i}"}]}
        for i in range(7)]
    src = tmp_path / "sft.json"
    src.write_text(json.dumps(records))
    out = json.loads(Path(multi_turn_sft(str(src), 3, str(tmp_path / "packed.json"))).read_text())
    assert [len(r["conversations"]) // 2 for r in out] == [3, 1, 3]  # img_0: 4 questions, img_1: 3
    for r in out:
        humans = [t["value"] for t in r["conversations"][::2]]
        assert humans[0].startswith("<image>\n") and not any("<image>" in h for h in humans[1:])
    asked = sorted(h.replace("<image>\n", "") for r in out for h in [t["value"] for t in r["conversations"][::2]])
    assert asked == sorted(f"question {i}?" for i in range(7))
    assert multi_turn_sft(str(src), 1, str(tmp_path / "unused.json")) == str(src)
