"""`make demo`: build the offline demo data, train a small VLM on the CPU with the real scripts, evaluate it.

Steps (each one a real entry point a user would run):
  1. scripts/build_demo_data.py   easy-vqa (MIT) -> v1 JSON pretrain captions, SFT Q/A, held-out test Q/A;
                                  real photos from scikit-image/scikit-learn -> dataset/eval_images
  2. the vision encoder           model/clip_model/clip-vit-base-patch32 when present, otherwise the
                                  untrained stand-in built by scripts/build_stand_in_clip.py (the full
                                  profile: its patch embeddings, no transformer layer)
  3. 1-pretrain_vlm.py            from scratch (no pretrained LLM offline) on the captions
  4. 2-sft_vlm.py                 on the questions and answers, three questions on one image per row
                                  (--pack_same_image: each question still sees only the image and itself)
  5. 3-eval_chat.py               the default question on every eval image, then exact-match accuracy on the
                                  held-out easy-vqa test questions beside the majority baseline
  6. scripts/plot_loss.py         the loss curves -> images/demo_loss.png

    python scripts/demo.py [--profile full|ci] [--preset minimind-v-small|minimind-v] [--out_dir out]
                           [--generation v1|3v]

--generation 3v (`make demo GENERATION=3v`) trains minimind-3v's network on the same data instead: the SigLIP2
tower at model/siglip2-base-p32-256-ve when present, otherwise an untrained SigLIP2-shaped stand-in
(scripts/build_stand_in_siglip.py), the project's 3v-style tokenizer (model/minimind_3v_tokenizer), 64 x <|image_pad|>
per image, the profile's questions per row (--pack_same_image, the 64-token run shared), the whole LLM trained in both stages (from scratch,
unlike 3v's own stage defaults); its files are out/pretrain_vlm_{dim}.pth, out/sft_vlm_{dim}.pth and
out/demo_summary_3v.json. The v1 demo is unchanged.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model.config import PRESETS  # noqa: E402
from model.vision import DEFAULT_CLIP_PATH, STAND_IN_CLIP_PATH, V3_TOWER_PATH  # noqa: E402
from checkpoints.tokenizer import PROJECT_V3_TOKENIZER_PATH  # noqa: E402
from checkpoints.vision_pairing import is_stand_in  # noqa: E402

# Model and schedule per profile; `full` is what `make demo` runs and the README reports (the recipe search
# behind it: bench/demo_recipes.py and bench/RESULTS.md). clip_layers=0: the stand-in's patch embeddings alone,
# which trained better than one random transformer layer on top. cpu_dtype "auto": bf16 autocast where it is
# measured faster on this CPU (trainer/cpu_dtype.py), else float32. During SFT,
# val_samples held-out questions are validated val_points times: the accuracy curve of the loss plot (a
# monitoring curve only: nothing is picked by it). compile: the stages trained with --compile. Neither is: on a
# fresh clone (cold inductor cache, AMD EPYC, 2 cores) compiling both stages saved nothing (695 s against 703 s
# eager, same session), since each stage pays its compile first, and cost accuracy (0.898 against 0.911).
PROFILES = {
    "full": dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, clip_layers=0, max_seq_len=128,
                 max_train_images=None, max_test_questions=None, pretrain_epochs=5, pretrain_lr=1e-3,
                 sft_epochs=3, sft_lr=1e-3, sft_pack=3, sft_max_seq_len=160, batch_size=16, group_by_length=False,
                 sft_max_steps=None, eval_limit=None, cpu_dtype="auto", val_samples=200, val_points=4,
                 compile=()),
    "ci": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, clip_layers=1, max_seq_len=128,
               max_train_images=600, max_test_questions=300, pretrain_epochs=10, pretrain_lr=2e-3,
               sft_epochs=2, sft_lr=2e-3, sft_pack=1, sft_max_seq_len=128, batch_size=32, group_by_length=False,
               sft_max_steps=None, eval_limit=None, cpu_dtype="float32", val_samples=40, val_points=2,
               compile=()),
}
# The CI profile trains 10 and 2 epochs: with one of each (19 pretraining steps, the caption loss still 6.0) neither
# generation used the image (shuffling the images across rows left the loss unchanged), and the held-out score
# came from the wording of the yes/no questions alone. With 10 and 2 the colour questions are answered from the
# image (docs/generations.md), which tests/test_demo.py and tests/test_demo_3v.py check.
# 3v's changes to a profile: rows long enough for a 64-token image (3 packed questions at 192), eager, as v1's.
V3_PROFILE_CHANGES = dict(max_seq_len=160, sft_max_seq_len=192, compile=())
V3_STAND_IN_PATH = "model/clip_model/stand_in_siglip2_base_p32_256"
PER_TYPE = re.compile(r"^\s+(\S+): accuracy ([\d.]+) \(n=(\d+), majority baseline ([\d.]+), '(.*)'\)$", re.M)


def write_val_monitor(test_path: str, out_path: str, n: int) -> int:
    """Every k-th held-out test question (spread over images and question types) into a small validation file."""
    with open(test_path) as f:
        records = json.load(f)
    picked = records[::max(1, len(records) // max(n, 1))][:n]
    with open(out_path, "w") as f:
        json.dump(picked, f)
    return len(picked)


def run(cmd: list[str], log_name: str, out_dir: str, echo: bool = True) -> tuple[str, float]:
    """Run a step, teeing its output to out_dir/logs/<log_name>.log; a failure stops the demo with its tail."""
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    log_path = os.path.join(out_dir, "logs", f"{log_name}.log")
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    lines = []
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True,
                                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if echo and "\r" not in line and not line.startswith(("pretrain:", "sft:", "encoding images")):
                print(line, end="", flush=True)
    if proc.returncode != 0:
        sys.exit(f"demo step failed ({' '.join(cmd[:2])}), exit {proc.returncode}; see {log_path}:\n"
                 + "".join(lines[-15:]))
    return "".join(lines), time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="full", choices=sorted(PROFILES))
    p.add_argument("--out_dir", default="out", help="checkpoints, logs, the feature cache and demo_summary.json")
    p.add_argument("--data_root", default="dataset")
    # 0: the batches are collated between steps in the training process. With features cached, a loader worker only
    # competes with the 2 compute threads on a 2-core machine: 300 SFT steps took 8% longer with one (bench/RESULTS.md).
    p.add_argument("--num_workers", type=int, default=0, help="data loader workers of the training stages")
    p.add_argument("--loss_plot", default="images/demo_loss.png")
    p.add_argument("--clip_dir", default=None,
                   help="where the stand-in encoder is built (default: model/clip_model); tests use a temp folder")
    p.add_argument("--cpu_dtype", default=None, choices=["auto", "float32", "bfloat16"],
                   help="training dtype on the CPU (default: the profile's; auto = bf16 autocast where measured faster)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="train a published size instead of the profile's small model (heads 16/8)")
    p.add_argument("--generation", default="v1", choices=["v1", "3v"],
                   help="v1 (default) or minimind-3v's network, tower shape and tokenizer")
    return p.parse_args()


def build_data(args: argparse.Namespace, cfg: dict, times: dict[str, float]) -> None:
    """1. the demo data"""
    data_cmd = [sys.executable, "scripts/build_demo_data.py", "--out", args.data_root]
    if cfg["max_train_images"]:
        data_cmd += ["--max_train_images", str(cfg["max_train_images"])]
    if cfg["max_test_questions"]:
        data_cmd += ["--max_test_questions", str(cfg["max_test_questions"])]
    _, times["data"] = run(data_cmd, "data", args.out_dir)


def stand_in_path(layers: int, clip_dir: str | None = None, generation: str = "v1") -> str:
    """Where the stand-in encoder with `layers` transformer layers lives: STAND_IN_CLIP_PATH (3v: V3_STAND_IN_PATH)
    for the full profile's 0 layers, a sibling folder named by its layer count otherwise; under clip_dir when given."""
    base = V3_STAND_IN_PATH if generation == "3v" else STAND_IN_CLIP_PATH
    path = base if layers == 0 else f"{base}_{layers}layer"
    return os.path.join(clip_dir, os.path.basename(path)) if clip_dir else path


def vision_encoder(args: argparse.Namespace, cfg: dict, times: dict[str, float]) -> str:
    """2. the real CLIP (3v: SigLIP2) when the user has it, else the stand-in (said loudly, built when missing)"""
    v3 = args.generation == "3v"
    real = V3_TOWER_PATH if v3 else DEFAULT_CLIP_PATH
    if os.path.exists(os.path.join(ROOT, real, "config.json")):
        print(f"\nusing the real {'SigLIP2 tower' if v3 else 'CLIP ViT-B/32'} at {real}")
        times["encoder"] = 0.0
        return real
    # One folder per layer count: a run of another profile must never replace the encoder a trained demo model
    # was trained on (its features would change under it, silently). The full profile's stays at the path the
    # README, the web demo and the tests name.
    clip = stand_in_path(cfg["clip_layers"], args.clip_dir, args.generation)
    shape = "SigLIP2-base-p32-256" if v3 else "CLIP ViT-B/32"
    print(f"\n[stand-in] no pretrained {'SigLIP2' if v3 else 'CLIP'} is available offline: the demo uses a randomly "
          f"initialised, UNTRAINED {shape}-shaped vision tower with {cfg['clip_layers']} transformer layer(s) after "
          f"its patch embedding ({clip}).")
    marker = os.path.join(ROOT, clip, "config.json")
    layers_ok = os.path.exists(marker) and json.load(open(marker)).get("num_hidden_layers") == cfg["clip_layers"]
    if not layers_ok:
        script = "scripts/build_stand_in_siglip.py" if v3 else "scripts/build_stand_in_clip.py"
        _, times["encoder"] = run([sys.executable, script, "--out", clip, "--layers", str(cfg["clip_layers"])],
                                  "encoder", args.out_dir)
    return clip


def stage_flags(cfg: dict, clip: str, out_dir: str, images_path: str, device: str = "cpu", num_workers: int = 1,
                preset: str | None = None) -> list[str]:
    """The flags both training stages share, for a profile's model and schedule."""
    size = ["--preset", preset] if preset else ["--dim", str(cfg["dim"]), "--n_layers", str(cfg["n_layers"])]
    flags = [*size, "--n_heads", str(cfg["n_heads"]), "--n_kv_heads", str(cfg["n_kv_heads"]),
             "--max_seq_len", str(cfg["max_seq_len"]), "--clip_path", clip, "--out_dir", out_dir, "--device", device,
             "--num_workers", str(num_workers), "--batch_size", str(cfg["batch_size"]),
             "--feature_cache", os.path.join(out_dir, "feature_cache"), "--save_interval", "100000",
             "--images_path", images_path]
    if cfg["cpu_bf16"] and device == "cpu":
        flags.append("--cpu_bf16")
    return flags + (["--group_by_length"] if cfg["group_by_length"] else [])


def pretrain_command(cfg: dict, flags: list[str], data_path: str) -> list[str]:
    """1-pretrain_vlm.py from scratch (no pretrained MiniMind LLM offline) on the captions."""
    return [sys.executable, "1-pretrain_vlm.py", *flags, "--from_scratch", "--data_path", data_path,
            "--epochs", str(cfg["pretrain_epochs"]), "--learning_rate", str(cfg["pretrain_lr"]), "--log_interval", "10",
            *(["--compile"] if "pretrain" in cfg["compile"] else [])]


def sft_command(cfg: dict, flags: list[str], data_path: str, val_path: str, val_images_path: str) -> list[str]:
    """2-sft_vlm.py on the questions, sft_pack questions on one image per row (--pack_same_image); it
    validates about val_points times on the questions in val_path."""
    with open(data_path) as f:
        records = json.load(f)
    with open(val_path) as f:
        n_val = len(json.load(f))
    # rows per epoch: the questions of each image in rows of up to sft_pack (what --pack_same_image makes when
    # the rows fit sft_max_seq_len; the eval interval only needs it roughly)
    per_image = collections.Counter(str(r.get("image")) for r in records)
    n_rows = sum(-(-n // cfg["sft_pack"]) for n in per_image.values())
    sft_steps = cfg["sft_max_steps"] or cfg["sft_epochs"] * -(-n_rows // cfg["batch_size"])
    cmd = [sys.executable, "2-sft_vlm.py", *flags, "--data_path", data_path, "--image_prefix", "",
           "--epochs", str(cfg["sft_epochs"]), "--learning_rate", str(cfg["sft_lr"]), "--log_interval", "50",
           "--warmup_iters", "20", "--val_data", val_path, "--val_images_path", val_images_path,
           "--val_samples", str(n_val), "--eval_interval", str(max(1, -(-sft_steps // cfg["val_points"])))]
    if cfg["sft_pack"] > 1:
        cmd += ["--pack_same_image", str(cfg["sft_pack"])]
    if "sft" in cfg["compile"]:
        cmd.append("--compile")
    cmd += ["--max_seq_len", str(cfg["sft_max_seq_len"])]  # after the shared flags: argparse keeps the last
    if cfg["sft_max_steps"]:
        cmd += ["--max_steps", str(cfg["sft_max_steps"])]
    return cmd


def choose_cpu_dtype(cfg: dict) -> str:
    """cfg["cpu_dtype"], with "auto" resolved by timing the demo's model in fp32 and bf16 on this CPU."""
    if cfg["cpu_dtype"] != "auto":
        return cfg["cpu_dtype"]
    import torch

    from model.config import LMConfig
    from model.vlm import MiniMindVLM
    from trainer.cpu_dtype import choose_cpu_train_dtype

    torch.manual_seed(0)
    model = MiniMindVLM(LMConfig(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                                 n_kv_heads=cfg["n_kv_heads"], max_seq_len=cfg["max_seq_len"]))
    choice = choose_cpu_train_dtype(model, cfg["batch_size"], cfg["max_seq_len"])
    print("\n" + choice.line, flush=True)
    return "bfloat16" if choice.bf16 else "float32"


def train_stages(args: argparse.Namespace, cfg: dict, clip: str, times: dict[str, float]) -> str:
    """3. pretrain, 4. SFT; returns the SFT checkpoint"""
    demo = os.path.join(args.data_root, "demo")
    flags = stage_flags(cfg, clip, args.out_dir, os.path.join(demo, "images", "train"), "cpu", args.num_workers,
                        args.preset)
    if args.generation == "3v":  # from scratch, so both stages train the whole LLM (3v's defaults freeze most)
        flags += ["--generation", "3v", "--tokenizer_path", PROJECT_V3_TOKENIZER_PATH, "--freeze_llm", "0"]
    _, times["pretrain"] = run(pretrain_command(cfg, flags, os.path.join(demo, "pretrain.json")), "pretrain",
                               args.out_dir)
    # SFT validates now and then on a few held-out questions: the accuracy curve of the loss plot
    val_path = os.path.join(args.out_dir, "val_monitor.json")
    write_val_monitor(os.path.join(demo, "test.json"), val_path, cfg["val_samples"])
    _, times["sft"] = run(sft_command(cfg, flags, os.path.join(demo, "sft.json"), val_path,
                                      os.path.join(demo, "images", "test")), "sft", args.out_dir)
    return stage_files(args, cfg)[1] + ".pth"


def stage_files(args: argparse.Namespace, cfg: dict) -> tuple[str, str]:
    """The pretrain and SFT checkpoints' paths without ".pth" (3v: upstream's names)."""
    if args.generation == "3v":
        return tuple(os.path.join(args.out_dir, f"{name}_{cfg['dim']}") for name in ("pretrain_vlm", "sft_vlm"))
    stem = os.path.join(args.out_dir, str(cfg["dim"]))
    return f"{stem}_vlm_pretrain", f"{stem}_vlm_sft"


def evaluate(args: argparse.Namespace, cfg: dict, clip: str, ckpt: str, times: dict[str, float]) -> dict:
    """5. chat over the real photos, then accuracy on the held-out questions"""
    demo = os.path.join(args.data_root, "demo")
    eval_common = [sys.executable, "3-eval_chat.py", "--ckpt", ckpt, "--clip_path", clip, "--device", "cpu"]
    chat_log, times["eval_chat"] = run([*eval_common, "--image", os.path.join(args.data_root, "eval_images"),
                                        "--prompt", "what color is the shape?", "--max_new_tokens", "16",
                                        "--temperature", "0", "--no_stream"], "eval_chat", args.out_dir)
    acc_cmd = [*eval_common, "--eval_data", os.path.join(demo, "test.json"),
               "--eval_images_path", os.path.join(demo, "images", "test")]
    if cfg["eval_limit"]:
        acc_cmd += ["--eval_limit", str(cfg["eval_limit"])]
    acc_log, times["accuracy"] = run(acc_cmd, "accuracy", args.out_dir)
    match = re.search(r"accuracy: ([\d.]+) \(n=(\d+), majority baseline ([\d.]+)\)", acc_log)
    if not match:
        sys.exit("demo: the accuracy evaluation printed no accuracy line")
    per_type = {m.group(1): {"accuracy": float(m.group(2)), "n": int(m.group(3)),
                             "majority_baseline": float(m.group(4)), "majority_answer": m.group(5)}
                for m in PER_TYPE.finditer(acc_log)}
    return {"accuracy": float(match.group(1)), "n": int(match.group(2)), "majority_baseline": float(match.group(3)),
            "per_type": per_type, "eval_images_answered": chat_log.count("[A]:")}


def main() -> None:
    args = parse_args()
    cfg = dict(PROFILES[args.profile])
    if args.preset:
        cfg.update(PRESETS[args.preset], n_heads=16, n_kv_heads=8)
    if args.cpu_dtype:
        cfg["cpu_dtype"] = args.cpu_dtype
    if args.generation == "3v":
        cfg.update(V3_PROFILE_CHANGES)
        if args.loss_plot == "images/demo_loss.png":
            args.loss_plot = "images/demo_loss_3v.png"
    times: dict[str, float] = {}
    started = time.perf_counter()
    build_data(args, cfg, times)
    clip = vision_encoder(args, cfg, times)
    cfg["cpu_bf16"] = choose_cpu_dtype(cfg) == "bfloat16"
    ckpt = train_stages(args, cfg, clip, times)
    scores = evaluate(args, cfg, clip, ckpt, times)
    # 6. loss curves
    pretrain_stem, sft_stem = stage_files(args, cfg)
    title = f"demo ({args.profile}{', 3v' if args.generation == '3v' else ''}): training loss (log scale), " \
            "validation accuracy"
    run([sys.executable, "scripts/plot_loss.py", f"{pretrain_stem}_log.jsonl", f"{sft_stem}_log.jsonl",
         "--out", args.loss_plot, "--title", title], "plot", args.out_dir)

    total = time.perf_counter() - started
    summary = {"profile": args.profile, "generation": args.generation, **scores, "vision_encoder": clip,
               "stand_in_encoder": is_stand_in(os.path.join(ROOT, clip)),
               "seconds": {k: round(v, 1) for k, v in times.items()}, "total_seconds": round(total, 1),
               "checkpoint": ckpt, "model": {k: cfg[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads")},
               "schedule": {k: cfg[k] for k in ("pretrain_epochs", "pretrain_lr", "sft_epochs", "sft_lr", "sft_pack",
                                                "sft_max_seq_len", "batch_size", "group_by_length", "cpu_dtype",
                                                "cpu_bf16")}}
    name = "demo_summary_3v.json" if args.generation == "3v" else "demo_summary.json"
    with open(os.path.join(args.out_dir, name), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n================ MiniMind-V demo summary ================")
    print(f"vision encoder : {clip}{'  (UNTRAINED STAND-IN, random weights)' if summary['stand_in_encoder'] else ''}")
    print(f"model          : dim {cfg['dim']}, {cfg['n_layers']} layers -> {ckpt}")
    print(f"eval images    : {scores['eval_images_answered']} answered (see {args.out_dir}/logs/eval_chat.log)")
    print(f"held-out test  : accuracy: {scores['accuracy']:.3f} (n={scores['n']}, majority baseline "
          f"{scores['majority_baseline']:.3f})")
    for name, t in sorted(scores["per_type"].items()):
        print(f"  {name:<13}: accuracy {t['accuracy']:.3f} (n={t['n']}, majority baseline "
              f"{t['majority_baseline']:.3f}, always '{t['majority_answer']}')")
    print(f"time           : {total / 60:.1f} min total; " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"loss curves    : {args.loss_plot}")
    print("chat with it   : python 3-eval_chat.py --ckpt", ckpt, "--clip_path", clip,
          "--image dataset/eval_images/cat.png --prompt 'what is in the image?'")


if __name__ == "__main__":
    main()
