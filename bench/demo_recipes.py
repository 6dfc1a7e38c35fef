"""Search for the demo's recipe: train variants of `make demo`'s full profile side by side, score each on the
held-out easy-VQA questions, and print one table.

The demo must run in 10 minutes on 2 CPU cores, which allows one recipe per run there. This script runs many at
once, on a GPU (or any machine with cores to spare), with the same entry points and data as the demo:
  - recipes that share a pretraining run it once; their SFT runs start from its checkpoint (--init);
  - each recipe reports its accuracy overall and per question type, and the tokens it trained on (padding
    included), which is what its time on the CPU scales with.
The accuracy of a recipe does not depend on the device it ran on beyond run-to-run noise; its CPU time must be
measured on the CPU (`make demo`).

    python bench/demo_recipes.py --device cuda --parallel 8 [--only clip0_pack3 ...] [--out_dir out/recipes]
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import time
from math import nan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.demo import PER_TYPE, pretrain_command, sft_command, stage_flags, write_val_monitor  # noqa: E402

# The schedule `make demo` ran before this search (0.854 on the CPU); every recipe names its changes to it.
# questions_per_record > 1 regroups an image's questions as multi-turn conversations (later questions see the
# earlier answers); sft_pack > 1 is --pack_same_image (each question sees only the image and itself).
BASE = dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, clip_layers=1, max_seq_len=128, max_train_images=None,
            max_test_questions=None, pretrain_epochs=8, pretrain_lr=1e-3, sft_epochs=2, sft_lr=1e-3, sft_pack=1,
            sft_max_seq_len=None, batch_size=16, group_by_length=False, sft_max_steps=None, eval_limit=None,
            cpu_bf16=True, val_samples=300, val_points=6, questions_per_record=1, seed=None)
# name -> changes to BASE. Both rounds ran on one H200 (bench/RESULTS.md has the table).
RECIPES: dict[str, dict] = {
    "default": {},
    "clip0": dict(clip_layers=0),
    "clip1_pack3": dict(questions_per_record=3, sft_epochs=3),
    "clip0_pack3": dict(clip_layers=0, questions_per_record=3, sft_epochs=3),
    "clip0_pack3_e4": dict(clip_layers=0, questions_per_record=3, sft_epochs=4),
    "clip0_pack3_e6": dict(clip_layers=0, questions_per_record=3, sft_epochs=6),
    "clip0_pack3_lr2": dict(clip_layers=0, questions_per_record=3, sft_epochs=3, sft_lr=2e-3),
    "clip0_pack8": dict(clip_layers=0, questions_per_record=8, max_seq_len=256, sft_epochs=4),
    "clip0_pack8_lr2": dict(clip_layers=0, questions_per_record=8, max_seq_len=256, sft_epochs=5, sft_lr=2e-3),
    "clip0_p5_pack3": dict(clip_layers=0, pretrain_epochs=5, pretrain_lr=2e-3, questions_per_record=3, sft_epochs=4),
    "clip0_p5_pack8": dict(clip_layers=0, pretrain_epochs=5, pretrain_lr=2e-3, questions_per_record=8,
                           max_seq_len=256, sft_epochs=5),
    "clip0_plr2_pack3": dict(clip_layers=0, pretrain_lr=2e-3, questions_per_record=3, sft_epochs=3),
    "clip0_d192l3_pack3": dict(clip_layers=0, dim=192, n_layers=3, questions_per_record=3, sft_epochs=3),
    # second round: cheaper schedules around clip0_pack8, and repeats with other seeds for the noise
    "c0_p8_k8_e3": dict(clip_layers=0, questions_per_record=8, max_seq_len=256, sft_epochs=3),
    "c0_p8_k8_e3_s2": dict(clip_layers=0, questions_per_record=8, max_seq_len=256, sft_epochs=3, seed=2),
    "c0_p8_k8_e3_s3": dict(clip_layers=0, questions_per_record=8, max_seq_len=256, sft_epochs=3, seed=3),
    "c0_p8_k8_e4_s2": dict(clip_layers=0, questions_per_record=8, max_seq_len=256, sft_epochs=4, seed=2),
    "c0_p8_k3_e3_s2": dict(clip_layers=0, questions_per_record=3, sft_epochs=3, seed=2),
    "c0_p6_k8_e3": dict(clip_layers=0, pretrain_epochs=6, questions_per_record=8, max_seq_len=256, sft_epochs=3),
    "c0_p6_k8_e3_lr15": dict(clip_layers=0, pretrain_epochs=6, questions_per_record=8, max_seq_len=256,
                             sft_epochs=3, sft_lr=1.5e-3),
    "c0_p5_k8_e3": dict(clip_layers=0, pretrain_epochs=5, questions_per_record=8, max_seq_len=256, sft_epochs=3),
    "c0_p5_k8_e4": dict(clip_layers=0, pretrain_epochs=5, questions_per_record=8, max_seq_len=256, sft_epochs=4),
    "c0_p3_k8_e4": dict(clip_layers=0, pretrain_epochs=3, questions_per_record=8, max_seq_len=256, sft_epochs=4),
    "c0_p8_k16_e3": dict(clip_layers=0, questions_per_record=16, max_seq_len=384, sft_epochs=3),
    # --pack_same_image: the questions stay independent
    "c0_p6_pack3_e3": dict(clip_layers=0, pretrain_epochs=6, sft_pack=3, sft_max_seq_len=160, sft_epochs=3),
}
PRETRAIN_KEYS = ("seed", "dim", "n_layers", "n_heads", "n_kv_heads", "clip_layers", "pretrain_epochs", "pretrain_lr",
                 "batch_size", "cpu_bf16", "group_by_length")


def run_logged(cmd: list[str], log_path: str) -> str:
    """Run one command to its log; a failure raises with the log's tail."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    text = open(log_path).read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}), {log_path}:\n{text[-1500:]}")
    return text


def padded_tokens(log_jsonl: str) -> int:
    """Positions the model ran on over a stage (rows x padded length, summed), from the trainer's own log."""
    total = 0
    with open(log_jsonl) as f:
        for line in f:
            record = json.loads(line)
            total += int(record.get("padded_tokens", 0))
    return total


def multi_turn_sft(sft_path: str, per_record: int, out_path: str) -> str:
    """The demo's SFT questions regrouped as multi-turn records of up to per_record questions per image, in a
    shuffled order (so no question type always comes first)."""
    if per_record == 1:
        return sft_path
    by_image: dict[str, list[dict]] = collections.defaultdict(list)
    for r in json.load(open(sft_path)):
        by_image[r["image"]].append(r)
    rng = random.Random(0)
    records = []
    for image, qs in by_image.items():
        rng.shuffle(qs)
        for k in range(0, len(qs), per_record):
            turns = [turn for r in qs[k:k + per_record] for turn in r["conversations"]]
            for turn in turns[2::2]:  # one <image>, in the first question
                turn["value"] = turn["value"].replace("<image>\n", "")
            records.append({"id": f"{image}_{k // per_record}", "image": image, "conversations": turns})
    with open(out_path, "w") as f:
        json.dump(records, f)
    return out_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", type=int, default=8, help="training runs at once")
    p.add_argument("--out_dir", default="out/recipes")
    p.add_argument("--data_root", default="dataset")
    p.add_argument("--only", nargs="*", default=None, choices=sorted(RECIPES))
    p.add_argument("--eval_limit", type=int, default=None, help="score only the first N test questions")
    p.add_argument("--max_steps", type=int, default=None, help="cap both stages (a dry run of the script)")
    args = p.parse_args()
    demo = os.path.join(args.data_root, "demo")
    if not os.path.exists(os.path.join(demo, "sft.json")):
        sys.exit(f"no demo data in {demo}: run `python scripts/build_demo_data.py --out {args.data_root}` first")
    os.makedirs(args.out_dir, exist_ok=True)
    recipes = {n: {**BASE, **RECIPES[n]} for n in (args.only or RECIPES)}
    for cfg in recipes.values():
        cfg["sft_max_seq_len"] = cfg["sft_max_seq_len"] or cfg["max_seq_len"]
    seed = lambda cfg: ["--seed", str(cfg["seed"])] if cfg["seed"] is not None else []  # noqa: E731
    py = sys.executable
    started = time.perf_counter()

    # the stand-in encoders (one per depth), the SFT files (one per packing), the validation file
    clips = {}
    for layers in sorted({c["clip_layers"] for c in recipes.values()}):
        clips[layers] = os.path.join(args.out_dir, f"stand_in_clip_{layers}")
        if not os.path.exists(os.path.join(clips[layers], "config.json")):
            run_logged([py, "scripts/build_stand_in_clip.py", "--out", clips[layers], "--layers", str(layers)],
                       os.path.join(args.out_dir, f"clip_{layers}.log"))
    sft_files = {k: multi_turn_sft(os.path.join(demo, "sft.json"), k, os.path.join(args.out_dir, f"sft_pack{k}.json"))
                 for k in sorted({c["questions_per_record"] for c in recipes.values()})}
    val_path = os.path.join(args.out_dir, "val_monitor.json")
    write_val_monitor(os.path.join(demo, "test.json"), val_path, BASE["val_samples"])
    train_images, test_images = os.path.join(demo, "images", "train"), os.path.join(demo, "images", "test")

    pretrains = {}  # key -> (dir, cfg)
    for cfg in recipes.values():
        key = tuple(cfg[k] for k in PRETRAIN_KEYS)
        pretrains.setdefault(key, (os.path.join(args.out_dir, f"pretrain_{len(pretrains)}"), cfg))

    def pretrain(key: tuple) -> float:
        out, cfg = pretrains[key]
        os.makedirs(out, exist_ok=True)
        flags = stage_flags(cfg, clips[cfg["clip_layers"]], out, train_images, args.device)
        cap = ["--max_steps", str(args.max_steps)] if args.max_steps else []
        run_logged(pretrain_command(cfg, flags, os.path.join(demo, "pretrain.json")) + cap + seed(cfg),
                   os.path.join(out, "train.log"))
        return padded_tokens(os.path.join(out, f"{cfg['dim']}_vlm_pretrain_log.jsonl"))

    def sft_and_score(name: str) -> dict:
        cfg = recipes[name]
        out = os.path.join(args.out_dir, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        start = pretrains[tuple(cfg[k] for k in PRETRAIN_KEYS)][0]
        clip = clips[cfg["clip_layers"]]
        flags = stage_flags(cfg, clip, out, train_images, args.device)
        cmd = sft_command(cfg, flags, sft_files[cfg["questions_per_record"]], val_path, test_images)
        if cfg["questions_per_record"] > 1:
            cmd.append("--multi_turn")
        cap = ["--max_steps", str(args.max_steps)] if args.max_steps else []
        run_logged(cmd + cap + seed(cfg) + ["--init", os.path.join(start, f"{cfg['dim']}_vlm_pretrain.pth")],
                   os.path.join(out, "sft.log"))
        acc_cmd = [py, "3-eval_chat.py", "--ckpt", os.path.join(out, f"{cfg['dim']}_vlm_sft.pth"), "--clip_path", clip,
                   "--device", args.device, "--eval_data", os.path.join(demo, "test.json"),
                   "--eval_images_path", test_images]
        if args.eval_limit:
            acc_cmd += ["--eval_limit", str(args.eval_limit)]
        log = run_logged(acc_cmd, os.path.join(out, "accuracy.log"))
        overall = [line for line in log.splitlines() if line.startswith("accuracy:")]
        return {"accuracy": float(overall[-1].split()[1]) if overall else float("nan"),
                "per_type": {m.group(1): float(m.group(2)) for m in PER_TYPE.finditer(log)},
                "sft_tokens": padded_tokens(os.path.join(out, f"{cfg['dim']}_vlm_sft_log.jsonl"))}

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        pre_tokens = dict(zip(pretrains, pool.map(pretrain, pretrains)))
        print(f"pretraining done ({len(pretrains)} runs) at {time.perf_counter() - started:.0f}s", flush=True)
        futures = {pool.submit(sft_and_score, n): n for n in recipes}
        print(f"\n{'recipe':<20} {'acc':>6} {'colour':>7} {'shape':>6} {'yes/no':>7} {'pre Mtok':>9} "
              f"{'sft Mtok':>9} {'done at':>8}  changes", flush=True)
        results = {}
        for fut in concurrent.futures.as_completed(futures):
            n = futures[fut]
            try:
                r = results[n] = fut.result()
            except RuntimeError as e:
                print(f"{n}: {e}", flush=True)
                continue
            t, pre = r["per_type"], pre_tokens[tuple(recipes[n][k] for k in PRETRAIN_KEYS)]
            print(f"{n:<20} {r['accuracy']:>6.3f} {t.get('colour', nan):>7.3f} {t.get('shape', nan):>6.3f} "
                  f"{t.get('yes/no', nan):>7.3f} {pre / 1e6:>9.2f} {r['sft_tokens'] / 1e6:>9.2f} "
                  f"{time.perf_counter() - started:>7.0f}s  {RECIPES[n]}", flush=True)
            with open(os.path.join(args.out_dir, "results.json"), "w") as f:
                json.dump({k: {**v, "changes": RECIPES[k]} for k, v in results.items()}, f, indent=1)
    print(f"\n{len(results)} recipes in {time.perf_counter() - started:.0f}s on {args.device}")


if __name__ == "__main__":
    main()
