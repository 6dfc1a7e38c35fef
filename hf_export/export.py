"""Convert between MiniMind-V checkpoints and Hugging Face (transformers) model directories (export_model.py is
the command line).

export() writes a directory that loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`:
config.json (model_type "minimind", auto_map to the bundled code), model.safetensors (v1 key names), the tokenizer,
preprocessor_config.json (the v1 image preprocessing), processor_config.json (MiniMindVProcessor for
AutoProcessor), the code of the network and of the two wrappers (files.CODE_FILES) and, with a CLIP path, the
CLIP vision tower in vision_encoder/ so that the model also accepts pixel_values. The export is checked by loading
it back through AutoModelForCausalLM and comparing logits with the native model.

import_hf() goes back: a published v1 Hugging Face directory (or one written here) to a checkpoint that
checkpoints.checkpoint.load_model reads. It reads the directory's weights and config only, never its code.

This module is not shipped inside an export (only hf_model.py and processing_minimind_v.py are, with the network),
so it may use checkpoints/.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from checkpoints.checkpoint import load_model, read_checkpoint, read_model_dir, save_checkpoint
from checkpoints.tokenizer import image_pad_id, image_token_ids, load_tokenizer
from checkpoints.tokenizer_pairing import checkpoint_tokenizer
from checkpoints.vision_pairing import check_encoder_family, check_vision_encoder, encoder_record
from model.decoder import count_parameters
from model.vision import ImagePreprocessor, SiglipPreprocessor, VisionEncoder, load_vision_encoder

from .files import VISION_SUBFOLDER, ExportError, check_out_dir, copy_model_code, move_into, staging_dir
from .model_card import model_card, training_facts
from .processing_minimind_v import MiniMindVProcessor

AUTO_MAP = {"AutoConfig": "config.LMConfig", "AutoModelForCausalLM": "hf_model.MiniMindVLMForCausalLM"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def preprocessor_config(preprocess: ImagePreprocessor) -> dict[str, Any]:
    """A CLIPImageProcessor config reproducing model.vision.ImagePreprocessor (a SiglipImageProcessor one for
    3v's SiglipPreprocessor).

    v1 squashes the image to size x size (no aspect-preserving resize, no centre crop), bicubic, then
    scales to [0, 1] and normalises with the CLIP mean/std; 3v the same with its tower's size, mean and std.
    """
    size = {"height": preprocess.size, "width": preprocess.size}
    siglip = isinstance(preprocess, SiglipPreprocessor)
    return {
        "image_processor_type": "SiglipImageProcessor" if siglip else "CLIPImageProcessor",
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




def bundle_vision_tower(encoder: VisionEncoder, out: Path, preprocess_cfg: dict[str, Any]) -> None:
    """Save only the vision tower (CLIP's, not its text tower; or 3v's SigLIP2) under out/vision_encoder/."""
    target = out / VISION_SUBFOLDER
    encoder.clip.save_pretrained(target)
    (target / "preprocessor_config.json").write_text(json.dumps(preprocess_cfg, indent=2) + "\n")


def export(ckpt: str, out: str, tokenizer_path: Optional[str] = None, clip_path: Optional[str] = None,
           dtype: str = "float32", verify: bool = True, license: str = "apache-2.0",
           repo_id: Optional[str] = None, allow_encoder_mismatch: bool = False, overwrite: bool = False) -> Path:
    """Write the Hugging Face directory for checkpoint `ckpt` (a file or a model directory) into `out`.

    The tokenizer is the checkpoint's own (checkpoints.tokenizer_pairing.checkpoint_tokenizer), or `tokenizer_path`
    when it has the same vocabulary. The vision tower bundled from `clip_path` must be the encoder the checkpoint
    records (checkpoints.vision_pairing), unless `allow_encoder_mismatch`. `out` must be new or an empty folder
    unless `overwrite` (files.check_out_dir: then its regular files of the same names are replaced, nothing
    else). Returns the output path."""
    from .hf_model import VISION_SUBFOLDER_FIELD, MiniMindVLMForCausalLM

    out_dir = Path(out)
    check_out_dir(out_dir, overwrite)  # before any work
    if not os.path.exists(ckpt):
        raise ExportError(f"checkpoint not found: {ckpt}")
    source = read_checkpoint(ckpt)
    tokenizer = load_tokenizer(checkpoint_tokenizer(source, tokenizer_path)[0])
    encoder = load_vision_encoder(clip_path) if clip_path else None  # raises a message that says how to get CLIP
    generation = source.stored.get("generation", "v1")  # read from the checkpoint, never from its name
    if encoder is not None:  # bundling another encoder than the one trained with would make pixel_values noise
        check_encoder_family(generation, encoder, source.path)  # v1 takes CLIP, 3v SigLIP: always refused
        check_vision_encoder(source.vision_record, encoder_record(encoder), source.path, allow_encoder_mismatch)
    native = load_model(source, image_ids=_image_ids(tokenizer, generation))
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

    staged = staging_dir(out_dir)
    try:
        write_files(staged, model, tokenizer, clip_path, encoder)
        card = model_card(config, count_parameters(native), training_facts(ckpt), license, repo_id or out_dir.name)
        (staged / "README.md").write_text(card, encoding="utf-8")
        move_into(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if verify:
        verify_export(out_dir, native.to(DTYPES[dtype]))
    return out_dir


def _image_ids(tokenizer, generation: str) -> list[int]:
    """The placeholder ids the model is built with: v1's 50-id span, or 3v's one <|image_pad|> id."""
    return image_pad_id(tokenizer) if generation == "3v" else image_token_ids(tokenizer)


def write_files(folder: Path, model: torch.nn.Module, tokenizer, clip_path: Optional[str],
                encoder: Optional[VisionEncoder]) -> None:
    """The export's files, but for the model card, into the empty `folder`."""
    model.save_pretrained(folder)
    generation = model.config.generation
    preprocess_class = SiglipPreprocessor if generation == "3v" else ImagePreprocessor
    preprocess = preprocess_class.from_dir(clip_path) if clip_path else None
    processor = MiniMindVProcessor(tokenizer, preprocess, generation=generation)
    # the tokenizer, plus processor_config.json registering MiniMindVProcessor for AutoProcessor
    processor.save_pretrained(folder)
    preprocess = processor.image_preprocessor
    preprocess_cfg = preprocessor_config(preprocess)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocess_cfg, indent=2) + "\n")
    copy_model_code(folder)
    if encoder is not None:
        bundle_vision_tower(encoder, folder, preprocess_cfg)


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
    if config.generation == "3v":  # a run of image_tokens (64) x the one <|image_pad|> id
        text = text.masked_fill(text == config.image_ids[0], 0)
        span = torch.tensor([config.image_ids * config.image_tokens])
    else:
        span = torch.tensor([config.image_ids])
    with_image = torch.cat([text[:, :4], span, text[:, 4:]], dim=1)
    features = torch.randn(1, config.image_tokens, config.vision_dim, generator=gen).to(native.output.weight.dtype)
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


# ---------------------------------------------------------------------------------------------- reverse
def import_hf(hf_dir: str, to: str, tokenizer_path: Optional[str] = None) -> Path:
    """Convert a Hugging Face MiniMind-V directory into `to` (.pth) plus its .config.json sidecar, which records
    the tokenizer (the directory's own unless --tokenizer_path names another with the same vocabulary). A minimind-3v
    directory (upstream's or one exported here) gives a 3v checkpoint in upstream's key layout (save_checkpoint)."""
    if not os.path.isdir(hf_dir):
        raise ExportError(f"{hf_dir}: not a Hugging Face model directory")
    ckpt = read_model_dir(hf_dir)
    tok_path, fingerprint = checkpoint_tokenizer(ckpt, tokenizer_path)
    model = load_model(ckpt, image_ids=_image_ids(load_tokenizer(tok_path), ckpt.stored.get("generation", "v1")))
    dtypes = {v.dtype for v in ckpt.state_dict.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # keep the published precision (and file size)
        model.to(dtypes.pop())
    save_checkpoint(model, to, tokenizer={"path": tok_path, "fingerprint": fingerprint})
    load_model(to)  # the point of the conversion: it must load back
    return Path(to)


