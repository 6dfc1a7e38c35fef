"""Convert between MiniMind-V checkpoints and Hugging Face (transformers) model directories.

Export a `.pth`/`.safetensors` checkpoint to a directory that loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`:

    python export_model.py --ckpt out/512_vlm_sft.pth --out out/minimind-v-hf [--clip_path DIR]

The directory holds config.json (model_type "minimind", auto_map to the bundled code), model.safetensors
(v1 key names), the tokenizer, preprocessor_config.json (the v1 image preprocessing), processor_config.json
(MiniMindVProcessor for AutoProcessor), the model code (config.py, decoder.py, feed_forward.py, vlm.py, hf_model.py,
vision.py, processing_minimind_v.py) and, with --clip_path, the CLIP vision tower in
vision_encoder/ so that the model also accepts pixel_values. The export is checked by loading it back
through AutoModelForCausalLM and comparing logits with the native model (skip with --no_verify).

Reverse, a published v1 Hugging Face directory (or one written by this script) back to a checkpoint that
checkpoints.checkpoint.load_model reads (`<name>.pth` plus its `<name>.config.json` sidecar):

    python export_model.py --from_hf DIR --to out/minimind_v1.pth
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from checkpoints.checkpoint import load_model, read_checkpoint, read_model_dir, save_checkpoint
from model.config import IMAGE_TOKENS, LMConfig
from model.decoder import count_parameters
from checkpoints.files import CheckpointError
from hf_export.processing_minimind_v import MiniMindVProcessor
from checkpoints.tokenizer import image_token_ids, load_tokenizer
from checkpoints.tokenizer_pairing import checkpoint_tokenizer
from model.vision import ImagePreprocessor, VisionEncoder, load_vision_encoder
from checkpoints.vision_pairing import OVERRIDE_FLAG, check_vision_encoder, encoder_record

WRAPPER_FILES = ("hf_model.py", "processing_minimind_v.py")  # hf_export/: what auto_map names
CODE_FILES = ("config.py", "decoder.py", "rope.py", "feed_forward.py", "vlm.py", "vision.py") + WRAPPER_FILES
VISION_SUBFOLDER = "vision_encoder"
AUTO_MAP = {"AutoConfig": "config.LMConfig", "AutoModelForCausalLM": "hf_model.MiniMindVLMForCausalLM"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(Exception):
    """A conversion that cannot be done; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------- export
def preprocessor_config(preprocess: ImagePreprocessor) -> dict[str, Any]:
    """A CLIPImageProcessor config reproducing model.vision.ImagePreprocessor.

    v1 squashes the image to size x size (no aspect-preserving resize, no centre crop), bicubic, then
    scales to [0, 1] and normalises with the CLIP mean/std.
    """
    size = {"height": preprocess.size, "width": preprocess.size}
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": size,
        "resample": 3,  # PIL bicubic
        "do_center_crop": False,
        "crop_size": size,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess.mean),
        "image_std": list(preprocess.std),
    }


def copy_model_code(out: Path) -> None:
    """Copy the network (model/) and the transformers wrappers (hf_export/) into the export, flat, so it loads as
    remote code: the wrappers' `from model.X import` becomes `from .X import`. Nothing else of the project ships."""
    from transformers.dynamic_module_utils import get_relative_import_files

    root = Path(__file__).resolve().parent
    for name in CODE_FILES:
        src = root / ("hf_export" if name in WRAPPER_FILES else "model") / name
        text = re.sub(r"^(\s*)from model\.(\w+) import", r"\1from .\2 import", src.read_text(), flags=re.M)
        if re.search(r"^\s*(from|import) (model|checkpoints|data_pipeline|inference|evaluation|trainer|hf_export)\b",
                     text, flags=re.M):
            raise ExportError(f"{src} imports project code outside the network, which an export cannot ship")
        (out / name).write_text(text)
    needed = {Path(p).name for name in WRAPPER_FILES for p in get_relative_import_files(out / name)}
    if needed - set(CODE_FILES):  # a new relative import in the model code must be shipped too
        raise ExportError(f"the model code imports {sorted(needed - set(CODE_FILES))}, which CODE_FILES does not copy")


def bundle_vision_tower(encoder: VisionEncoder, out: Path, preprocess_cfg: dict[str, Any]) -> None:
    """Save only the CLIP vision tower (not the text tower) under out/vision_encoder/."""
    target = out / VISION_SUBFOLDER
    encoder.clip.save_pretrained(target)
    (target / "preprocessor_config.json").write_text(json.dumps(preprocess_cfg, indent=2) + "\n")


def export(ckpt: str, out: str, tokenizer_path: Optional[str] = None, clip_path: Optional[str] = None,
           dtype: str = "float32", verify: bool = True, license: str = "apache-2.0",
           repo_id: Optional[str] = None, allow_encoder_mismatch: bool = False) -> Path:
    """Write the Hugging Face directory for checkpoint `ckpt` (a file or a model directory) into `out`.

    The tokenizer is the checkpoint's own (checkpoints.tokenizer_pairing.checkpoint_tokenizer), or `tokenizer_path`
    when it has the same vocabulary. The vision tower bundled from `clip_path` must be the encoder the checkpoint
    records (checkpoints.vision_pairing), unless `allow_encoder_mismatch`. Returns the output path."""
    from hf_export.hf_model import VISION_SUBFOLDER_FIELD, MiniMindVLMForCausalLM

    if not os.path.exists(ckpt):
        raise ExportError(f"checkpoint not found: {ckpt}")
    source = read_checkpoint(ckpt)
    tokenizer = load_tokenizer(checkpoint_tokenizer(source, tokenizer_path)[0])
    encoder = load_vision_encoder(clip_path) if clip_path else None  # raises a message that says how to get CLIP
    if encoder is not None:  # bundling another encoder than the one trained with would make pixel_values noise
        check_vision_encoder(source.vision_record, encoder_record(encoder), source.path, allow_encoder_mismatch)
    native = load_model(source, image_ids=image_token_ids(tokenizer))
    config = copy.deepcopy(native.config)
    config.tie_word_embeddings = True
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MiniMindVLMForCausalLM"]
    setattr(config, VISION_SUBFOLDER_FIELD, VISION_SUBFOLDER if clip_path else None)

    model = MiniMindVLMForCausalLM(config)
    # Same key names on both sides, so this is a strict, complete copy.
    model.load_state_dict(native.state_dict(), strict=True)
    model.to(DTYPES[dtype]).eval()
    # generate() stops at the chat template's end token, and pads finished rows with it (there is no pad token).
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    preprocess = ImagePreprocessor.from_dir(clip_path) if clip_path else ImagePreprocessor()
    # the tokenizer, plus processor_config.json registering MiniMindVProcessor for AutoProcessor
    MiniMindVProcessor(tokenizer, preprocess).save_pretrained(out_dir)
    preprocess_cfg = preprocessor_config(preprocess)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocess_cfg, indent=2) + "\n")
    copy_model_code(out_dir)
    card = model_card(config, count_parameters(native), training_facts(ckpt), license, repo_id or out_dir.name)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    if encoder is not None:
        bundle_vision_tower(encoder, out_dir, preprocess_cfg)
    if verify:
        verify_export(out_dir, native.to(DTYPES[dtype]))
    return out_dir


def verify_export(out_dir: Path, native: torch.nn.Module, atol: float = 1e-5) -> float:
    """Load the export through AutoModelForCausalLM and compare logits with the native model (text and image).

    Returns the largest absolute difference; raises ExportError above atol (scaled for half precision).
    """
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True, dtype=native.output.weight.dtype)
    loaded.eval()
    config = native.config
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.vocab_size, (1, 16), generator=gen)
    span = torch.tensor([config.image_ids])
    with_image = torch.cat([text[:, :4], span, text[:, 4:]], dim=1)
    features = torch.randn(1, IMAGE_TOKENS, config.vision_dim, generator=gen).to(native.output.weight.dtype)
    worst = 0.0
    with torch.no_grad():
        for ids, feats in ((text, None), (with_image, features)):
            a = native(ids, feats).logits.float()
            b = loaded(input_ids=ids, image_features=feats).logits.float()
            worst = max(worst, float((a - b).abs().max()))
    limit = atol if native.output.weight.dtype == torch.float32 else 1e-2
    if worst > limit:
        raise ExportError(f"{out_dir}: the exported model's logits differ from the checkpoint's by {worst:.3g}")
    return worst


# ---------------------------------------------------------------------------------------------- model card, Hub
def training_facts(ckpt: str) -> dict[str, Any]:
    """What the files beside a checkpoint say about its training: `<name>_run.json` (data, batch, epochs,
    written by the trainer), `<name>_log.jsonl` (steps, last loss) and the demo's `demo_summary.json`
    (held-out accuracy) when it names this checkpoint. Missing or unreadable files give no facts."""
    base = os.path.splitext(ckpt)[0]
    facts: dict[str, Any] = {}
    try:
        facts["run"] = json.loads(Path(base + "_run.json").read_text())
    except (OSError, ValueError):
        pass
    try:
        rows = [json.loads(line) for line in Path(base + "_log.jsonl").read_text().splitlines() if line.strip()]
        steps = [r for r in rows if isinstance(r, dict) and "step" in r]
        if steps:
            facts["log"] = {"steps": steps[-1]["step"], "last_loss": steps[-1].get("loss"),
                            "epochs": steps[-1].get("epoch", 0) + 1}
    except (OSError, ValueError):
        pass
    try:
        summary = json.loads((Path(ckpt).parent / "demo_summary.json").read_text())
        if os.path.basename(str(summary.get("checkpoint", ""))) == os.path.basename(ckpt):
            facts["eval"] = {k: summary[k] for k in ("accuracy", "n", "majority_baseline") if k in summary}
    except (OSError, ValueError, AttributeError):
        pass
    return facts


def model_card(config: LMConfig, n_params: int, facts: dict[str, Any], license: str, repo_id: str) -> str:
    """README.md of the export: YAML metadata, then the config, size, training and evaluation facts."""
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "use_moe", "vision_dim",
              "vision_proj_bias")
    lines = ["---", f"license: {license}", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags:", "  - minimind-v", "  - vision-language", "  - image-text-to-text", "  - custom_code", "---",
             "", f"# {repo_id.split('/')[-1]}", "",
             "A MiniMind-V vision-language model: the MiniMind decoder with a projection of frozen CLIP ViT-B/32 "
             "features spliced over a 50-token image placeholder.", "",
             f"Parameters: **{n_params:,}** (tied embedding counted once; the CLIP tower not included).", "",
             "| config | value |", "|---|---|"]
    lines += [f"| {f} | {getattr(config, f)} |" for f in fields]
    lines += ["", "## Training", ""]
    run, log = facts.get("run"), facts.get("log")
    if run:
        lines += [f"- {k}: {v}" for k, v in run.items()]
    if log:
        lines += [f"- optimizer steps: {log['steps']} (epochs reached: {log['epochs']}); last logged loss: "
                  f"{log['last_loss']}"]
    if not run and not log:
        lines += ["No training record was found beside the checkpoint."]
    lines += ["", "## Evaluation", ""]
    ev = facts.get("eval")
    lines += ([f"Exact-match accuracy {ev.get('accuracy')} on {ev.get('n')} held-out questions (majority baseline "
               f"{ev.get('majority_baseline')})."] if ev else ["No evaluation figures were recorded."])
    lines += ["", "## Usage", "", "```python", "from PIL import Image",
              "from transformers import AutoModelForCausalLM, AutoProcessor",
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
              f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)',
              'inputs = processor(images=[Image.open("cat.png")], text=[{"role": "user", "content": '
              '"What is in the picture?"}], return_tensors="pt")',
              'new = model.generate(**inputs, max_new_tokens=64)[:, inputs["input_ids"].shape[1]:]',
              "print(processor.batch_decode(new, skip_special_tokens=True))", "```", "",
              "`pixel_values` need the CLIP vision tower in `vision_encoder/` (exported with `--clip_path`); "
              "otherwise pass `image_features`.", ""]
    return "\n".join(lines)


def hub_token(repo_id: str) -> str:
    """The Hugging Face token to push repo_id with; a bad repo id or no token is an ExportError."""
    import huggingface_hub

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"--push_to_hub takes USER/NAME (or ORG/NAME), got {repo_id!r}")
    token = huggingface_hub.get_token()
    if not token:
        raise ExportError("no Hugging Face token is set: run `hf auth login` or set HF_TOKEN, then rerun with "
                          "--push_to_hub")
    return token


def push_to_hub(out_dir: Path, repo_id: str, private: bool) -> str:
    """Create (or reuse) the model repo and upload the export; returns the repo URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=hub_token(repo_id))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="model",
                          commit_message="Upload MiniMind-V export")
    except Exception as e:  # network and Hub errors: one line, the local export stays
        raise ExportError(f"pushing {out_dir} to {repo_id} failed: {type(e).__name__}: {e}") from None
    return str(url)


# ---------------------------------------------------------------------------------------------- reverse
def import_hf(hf_dir: str, to: str, tokenizer_path: Optional[str] = None) -> Path:
    """Convert a Hugging Face MiniMind-V directory into `to` (.pth) plus its .config.json sidecar, which records
    the tokenizer (the directory's own unless --tokenizer_path names another with the same vocabulary)."""
    if not os.path.isdir(hf_dir):
        raise ExportError(f"{hf_dir}: not a Hugging Face model directory")
    ckpt = read_model_dir(hf_dir)
    tok_path, fingerprint = checkpoint_tokenizer(ckpt, tokenizer_path)
    model = load_model(ckpt, image_ids=image_token_ids(load_tokenizer(tok_path)))
    dtypes = {v.dtype for v in ckpt.state_dict.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # keep the published precision (and file size)
        model.to(dtypes.pop())
    save_checkpoint(model, to, tokenizer={"path": tok_path, "fingerprint": fingerprint})
    load_model(to)  # the point of the conversion: it must load back
    return Path(to)


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint to export (.pth, .safetensors or a model directory)")
    p.add_argument("--out", help="output directory for the Hugging Face export")
    p.add_argument("--tokenizer_path", default=None,
                   help="tokenizer directory (default: the checkpoint's own: the one inside a model directory, the "
                        "one its sidecar records, or model/minimind_tokenizer_official for a published v1 file)")
    p.add_argument("--clip_path", default=None, help="CLIP directory whose vision tower is bundled (enables "
                   "pixel_values); it must be the encoder the checkpoint records")
    p.add_argument(OVERRIDE_FLAG, action="store_true",
                   help="bundle --clip_path even when the checkpoint records another vision encoder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="precision of the exported weights")
    p.add_argument("--no_verify", action="store_true", help="skip loading the export back to compare logits")
    p.add_argument("--from_hf", help="reverse: a Hugging Face MiniMind-V directory to convert")
    p.add_argument("--to", help="reverse: the .pth checkpoint to write")
    p.add_argument("--push_to_hub", metavar="USER/NAME", default=None,
                   help="after exporting, upload the directory to this Hugging Face model repo (needs a token)")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    p.add_argument("--license", default="apache-2.0", help="license in the model card's metadata")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tiny files: the weight-writing bars are noise
    try:
        if args.from_hf or args.to:
            if not (args.from_hf and args.to):
                raise ExportError("--from_hf DIR and --to PATH.pth go together")
            path = import_hf(args.from_hf, args.to, args.tokenizer_path)
            print(f"wrote {path} and {path.with_suffix('.config.json')}")
        else:
            if not args.ckpt or not args.out:
                raise ExportError("--ckpt PATH and --out DIR are required (or --from_hf DIR --to PATH.pth)")
            if args.push_to_hub:  # refuse a bad repo id or a missing token before the export work
                hub_token(args.push_to_hub)
            out = export(args.ckpt, args.out, args.tokenizer_path, args.clip_path, args.dtype,
                         verify=not args.no_verify, license=args.license, repo_id=args.push_to_hub,
                         allow_encoder_mismatch=args.allow_encoder_mismatch)
            print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True))")
            if args.push_to_hub:
                print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as e:
        # One line, no traceback: these are all problems with the inputs.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"export_model.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
