"""MiniMind-V as a Hugging Face `PreTrainedModel`, for `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`.

The wrapper holds the very modules `MiniMindVLM` builds (`tok_embeddings`, `layers`, `norm`, `output`,
`vision_proj`) directly under itself, so its state-dict keys are the v1 keys and the numerics are the native
ones: the forward pass borrows `MiniMindVLM`'s own methods instead of re-implementing them.

This file is copied verbatim into an exported model directory (see export_model.py) next to LMConfig.py,
model.py and vision_utils.py; it therefore imports only through relative imports, which work both inside the
`model` package and as a transformers remote-code module.

Images: pass `image_features` [N, 50, vision_dim] (CLIP encoder output before the post-layernorm, as
model.vision_utils computes it), or `pixel_values` [N, 3, 224, 224] when the export bundled the CLIP vision
tower in the `vision_encoder/` subfolder (export_model.py --clip_path).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .LMConfig import IMAGE_TOKENS, LMConfig
from .model import KVCache, MiniMindLM, MiniMindVLM, MoEGate, RMSNorm, rope_tables

# The config field naming the bundled vision-tower subfolder (absent or None when nothing was bundled).
VISION_SUBFOLDER_FIELD = "vision_encoder_subfolder"


class MiniMindVLMForCausalLM(PreTrainedModel, GenerationMixin):
    """MiniMindVLM behind the transformers interfaces (from_pretrained, forward -> CausalLMOutputWithPast, generate).

    `generate()` recomputes the whole sequence at every step (transformers' Cache does not fit the native
    attention); `generate_stream()` is the native sampler with its KV cache, for long outputs. A wrapper built
    directly from a config gets transformers-style random init: train with MiniMindVLM, then export.
    """

    config_class = LMConfig
    base_model_prefix = ""  # no `model.` prefix: the saved keys are exactly v1's
    main_input_name = "input_ids"
    input_modalities = ["image", "text"]
    _no_split_modules = ["Block"]
    # transformers v5 form: {target: source}. The output head shares the embedding matrix, so only
    # `tok_embeddings.weight` is written and `output.weight` is re-tied on load.
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}

    # The native forward pieces, used unchanged: they only touch attributes this class also has.
    _extend_rope = MiniMindLM._extend_rope
    embed = MiniMindLM.embed
    run_blocks = MiniMindLM.run_blocks
    aux_loss = MiniMindLM.aux_loss
    logits_and_loss = MiniMindLM.logits_and_loss
    find_image_spans = MiniMindVLM.find_image_spans
    splice_images = MiniMindVLM.splice_images
    generate_stream = MiniMindVLM.generate_stream  # the native sampler with its pre-allocated KV cache

    def __init__(self, config: LMConfig):
        # MiniMind always ties the head to the embedding; transformers only honours the tie when the config says so.
        if getattr(config, "tie_word_embeddings", None) is None:
            config.tie_word_embeddings = True
        super().__init__(config)
        # Build the native model and adopt its children and buffers: same modules, same key names, same forward.
        # (post_init below then applies _init_weights; from_pretrained overwrites every weight anyway.)
        native = MiniMindVLM(config)
        for name, child in native.named_children():
            self.add_module(name, child)
        for name, buffer in native.named_buffers(recurse=False):
            # Every MiniMindVLM buffer is derived (RoPE tables, placeholder ids), never saved.
            self.register_buffer(name, buffer, persistent=False)
        self._rope_len = native._rope_len
        self.post_init()

    # ------------------------------------------------------------------ transformers hooks
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise what a checkpoint did not provide (transformers calls this per module).

        The root module recomputes its derived buffers: from_pretrained builds the model on the meta device,
        so the RoPE tables and placeholder ids come back as uninitialised memory otherwise.
        """
        if module is self:
            cos, sin = rope_tables(self.config.head_dim, self._rope_len, self.config.rope_theta,
                                   device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
            ids = self.config.image_ids if self.config.image_ids is not None else [-1] * IMAGE_TOKENS
            self.image_ids.copy_(torch.tensor(ids, dtype=self.image_ids.dtype))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoEGate):
            nn.init.kaiming_uniform_(module.weight, a=5 ** 0.5)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output = value

    # ------------------------------------------------------------------ images
    def vision_encoder(self):
        """The bundled CLIP vision tower (model.vision_utils.VisionEncoder), loaded on first use."""
        encoder = self.__dict__.get("_vision_encoder")
        if encoder is None:
            subfolder = getattr(self.config, VISION_SUBFOLDER_FIELD, None)
            if not subfolder:
                raise ValueError("pixel_values needs a CLIP vision tower, and this export bundles none: pass "
                                 "image_features [N, 50, vision_dim] computed with model.vision_utils instead, or "
                                 "re-export with `python export_model.py --clip_path DIR`")
            from .vision_utils import load_vision_encoder

            encoder = load_vision_encoder(self._resolve_subfolder(subfolder), device=self.device)
            # Kept out of the module tree on purpose: a registered submodule would add keys to the state dict.
            self.__dict__["_vision_encoder"] = encoder
        if encoder.device != self.device:
            encoder.to(self.device)
        return encoder

    def _resolve_subfolder(self, subfolder: str) -> str:
        base = self.name_or_path or getattr(self.config, "_name_or_path", "")
        if not base:
            raise FileNotFoundError("cannot locate the vision tower: the model was not loaded with from_pretrained")
        local = os.path.join(base, subfolder)
        if os.path.isdir(local):
            return local
        if not os.path.isdir(base):  # a Hub repo id: fetch just the subfolder
            from huggingface_hub import snapshot_download

            return os.path.join(snapshot_download(base, allow_patterns=[f"{subfolder}/*"]), subfolder)
        raise FileNotFoundError(f"vision tower folder not found: {local}")

    # ------------------------------------------------------------------ generate
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no transformers Cache: every generate() step runs the full sequence

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, image_features: Optional[torch.Tensor] = None,
                                      attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> dict[str, Any]:
        # The full sequence each step (no cache), with the image spliced in again at its placeholder.
        return {"input_ids": input_ids, "image_features": image_features, "attention_mask": attention_mask}

    def generate(self, inputs: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                 **kwargs: Any):
        """transformers generate(); pixel_values are encoded once here rather than at every step."""
        if pixel_values is not None:
            if kwargs.get("image_features") is not None:
                raise ValueError("pass either image_features or pixel_values, not both")
            kwargs["image_features"] = self.vision_encoder().encode_pixels(pixel_values)
        return super().generate(inputs, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        image_features: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for every position (and the shifted next-token loss when labels are given, -100 ignored).

        `cache` (a model.model.KVCache) may be passed as a keyword for incremental decoding; other transformers
        keywords (use_cache, return_dict, ...) are accepted and ignored.
        """
        if image_features is not None and pixel_values is not None:
            raise ValueError("pass either image_features or pixel_values, not both")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            # The decoder has no padding mask: padded rows would silently attend to padding.
            raise ValueError("padding is not supported: attention_mask must be all ones (run rows one at a time)")
        if pixel_values is not None:
            image_features = self.vision_encoder().encode_pixels(pixel_values)
        cache = kwargs.get("cache")
        if not isinstance(cache, KVCache):  # only the native cache (generate_stream); not a transformers Cache
            cache = None
        h = self.splice_images(self.embed(input_ids), input_ids, image_features)
        out = self.logits_and_loss(self.run_blocks(h, cache), labels)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
