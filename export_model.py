"""Convert between MiniMind-V checkpoints and Hugging Face (transformers) model directories.

Export a `.pth`/`.safetensors` checkpoint to a directory that loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`:

    python export_model.py --ckpt out/512_vlm_sft.pth --out out/minimind-v-hf [--clip_path DIR]

The directory holds config.json (model_type "minimind", auto_map to the bundled code), model.safetensors
(v1 key names), the tokenizer, preprocessor_config.json (the v1 image preprocessing), processor_config.json
(MiniMindVProcessor for AutoProcessor), the model code (config.py, decoder.py, feed_forward.py, vlm.py, hf_model.py,
vision.py, processing_minimind_v.py) and, with --clip_path, the CLIP vision tower in
vision_encoder/ so that the model also accepts pixel_values. --out must be new or an empty folder (--overwrite
replaces the export's files in a non-empty one). The export is checked by loading it back
through AutoModelForCausalLM and comparing logits with the native model (skip with --no_verify).

Reverse, a published v1 Hugging Face directory (or one written by this script) back to a checkpoint that
checkpoints.checkpoint.load_model reads (`<name>.pth` plus its `<name>.config.json` sidecar):

    python export_model.py --from_hf DIR --to out/minimind_v1.pth
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from checkpoints.files import CheckpointError
from checkpoints.vision_pairing import OVERRIDE_FLAG
# The conversion lives in hf_export/ (export.py, files.py, model_card.py); these names stay importable from here.
from hf_export.export import DTYPES, export, import_hf, verify_export  # noqa: F401
from hf_export.files import CODE_FILES, ExportError  # noqa: F401
from hf_export.model_card import hub_token, push_to_hub


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint to export (.pth, .safetensors or a model directory)")
    p.add_argument("--out", help="output directory for the Hugging Face export: new, or an empty folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing its files of the export's names (regular files "
                        "only: a folder, symlink or special file in the way is still refused)")
    p.add_argument("--tokenizer_path", default=None,
                   help="tokenizer directory (default: the checkpoint's own: the one inside a model directory, the "
                        "one its sidecar records, or the official one for a published file: "
                        "model/minimind_tokenizer_official for v1, model/minimind_3v_tokenizer_official for 3v)")
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
                         allow_encoder_mismatch=args.allow_encoder_mismatch, overwrite=args.overwrite)
            print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True))")
            if args.push_to_hub:
                print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    except (ExportError, CheckpointError, OSError, ValueError) as e:
        # One line, no traceback: these are all problems with the inputs.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"export_model.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
