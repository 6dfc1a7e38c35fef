"""MiniMind-V as a Hugging Face `PreTrainedModel`, for `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`.

The wrapper holds the very modules `MiniMindVLM` builds (`tok_embeddings`, `layers`, `norm`, `output`,
`vision_proj`) directly under itself, so its state-dict keys are the v1 keys and the numerics are the native
ones: the forward pass borrows `MiniMindVLM`'s own methods instead of re-implementing them.

This file is copied into an exported model directory (hf_export/files.py: `from model.X` becomes `from .X`) next
to the network files it imports, and to nothing else of the project.

Decode speed on CPU: one decode step multiplies one activation row by every weight matrix, so it is as fast as the
product streams the weights. `from_pretrained` lays the decoder's weights out for that (stream_weights): each
weight column-major (the [in, out] matrix contiguous, which the matrix-vector product reads faster than the
[out, in] rows as stored on the CPUs measured; docs/export.md), and the projections that read the same input
(wq, wk, wv; w1, w3) as column blocks of one matrix, multiplied once at inference. The parameters, their names
and shapes, and the numerics (up to summation order) stay those of the native model.

Images: pass `image_features` [N, 50, vision_dim] (v1: CLIP encoder output before the post-layernorm, as
model.vision computes it; minimind-3v: [N, 64, vision_dim], the SigLIP2 tower's last_hidden_state), or
`pixel_values` ([N, 3, 224, 224] v1, [N, 3, 256, 256] 3v) when the export bundled the vision tower in the
`vision_encoder/` subfolder (export_model.py --clip_path). The config's `generation` says which network it is.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.config import IMAGE_TOKENS, LMConfig
from model.decoder import KVCache, MiniMindLM, RMSNorm, mask_padding_labels, rope_tables
from model.feed_forward import MoEGate
from model.vlm import MiniMindVLM

# The config field naming the bundled vision-tower subfolder (absent or None when nothing was bundled).
VISION_SUBFOLDER_FIELD = "vision_encoder_subfolder"


class MiniMindVLMForCausalLM(PreTrainedModel, GenerationMixin):
    """MiniMindVLM behind the transformers interfaces (from_pretrained, forward -> CausalLMOutputWithPast, generate).

    `generate()` keeps keys and values in a transformers `DynamicCache` (`cache`): the prompt and the image run
    once, then one new token per step. Left-padded batches work through `attention_mask`. `generate_stream()`
    is the native sampler with its pre-allocated KV cache. A wrapper built directly from a config gets
    transformers-style random init: train with MiniMindVLM, then export.
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
    next_token_logits = MiniMindVLM.next_token_logits  # its decode step

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
            v3 = self.config.generation == "3v"  # 3v: YaRN when configured, and one placeholder id
            cos, sin = rope_tables(self.config.head_dim, self._rope_len, self.config.rope_theta,
                                   device=self.rope_cos.device, yarn=self.config.rope_yarn if v3 else None)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
            ids = self.config.image_ids if self.config.image_ids is not None else [-1] * (1 if v3 else IMAGE_TOKENS)
            self.image_ids.copy_(torch.tensor(ids, dtype=self.image_ids.dtype))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            MiniMindLM._init_weights(module)  # the native model's init
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
        """The bundled CLIP vision tower (model.vision.VisionEncoder), loaded on first use."""
        encoder = self.__dict__.get("_vision_encoder")
        if encoder is None:
            subfolder = getattr(self.config, VISION_SUBFOLDER_FIELD, None)
            if not subfolder:
                raise ValueError(f"pixel_values needs a vision tower, and this export bundles none: pass "
                                 f"image_features [N, {self.config.image_tokens}, vision_dim] computed with "
                                 f"model.vision instead, or re-export with `python export_model.py --clip_path DIR`")
            from model.vision import load_vision_encoder

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
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """transformers' own preparation (after the prefill only the new token is fed, with the cache); the image
        is spliced in at the prefill alone: later steps have no placeholder to replace."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = inputs.get("cache")
        if isinstance(cache, Cache) and cache.get_seq_length() > 0:
            inputs.pop("image_features", None)
            inputs.pop("pixel_values", None)
        return inputs

    def generate(self, inputs: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                 **kwargs: Any):
        """transformers generate(); pixel_values are encoded once here rather than at every step."""
        if pixel_values is not None:
            if kwargs.get("image_features") is not None:
                raise ValueError("pass either image_features or pixel_values, not both")
            kwargs["image_features"] = self.vision_encoder().encode_pixels(pixel_values)
        return super().generate(inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' from_pretrained, then the weights laid out for decoding (stream_weights)."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).stream_weights()
        return loaded

    def stream_weights(self) -> None:
        """Lay the decoder's weights out for fast matrix-vector products, in place (see the module docstring).

        The same Parameter objects keep their names and shapes; only their memory layout changes. Call it again
        after moving or casting the model (which gives each weight its own storage back: still correct, but no
        longer stacked)."""
        with torch.no_grad():
            for module in self.layers.modules():
                for names in (("wq", "wk", "wv"), ("w1", "w3")):
                    linears = [getattr(module, name, None) for name in names]
                    if all(type(lin) in (nn.Linear, StackedLinear) and lin.bias is None for lin in linears):
                        _ColumnBlock(linears)
            for module in list(self.layers.modules()) + [self.output]:
                if type(module) is nn.Linear:
                    module.weight.data = module.weight.t().contiguous().t()  # the tied embedding follows

    def save_pretrained(self, *args: Any, **kwargs: Any):
        """transformers' save_pretrained, from the weights in their plain row-major layout (safetensors stores
        contiguous tensors; the file is the one a plain model writes), then laid out for decoding again."""
        streamed = any(isinstance(m, StackedLinear) for m in self.layers.modules())
        with torch.no_grad():
            for param in self.parameters():  # each once (the tied embedding and head are one parameter)
                param.data = param.data.contiguous()
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            if streamed:
                self.stream_weights()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        image_features: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[Any] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted next-token loss when labels are given, -100 ignored).

        attention_mask: 1 = token, 0 = padding (left padding to generate, right padding to score); padded
        positions are kept out of attention and of the loss, and positions count real tokens only (so
        position_ids, if passed, are not needed). cache: a transformers Cache (what generate() passes; with
        use_cache=True and none given a DynamicCache is made and returned as `.cache`), or the native KVCache.
        logits_to_keep > 0 computes logits for the last that many positions only (generate() asks for 1).
        Other transformers keywords (return_dict, position_ids, ...) are accepted and ignored.
        """
        if image_features is not None and pixel_values is not None:
            raise ValueError("pass either image_features or pixel_values, not both")
        if pixel_values is not None:
            image_features = self.vision_encoder().encode_pixels(pixel_values)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        blocks_cache = _TransformersCacheView(cache) if isinstance(cache, Cache) else cache
        if blocks_cache is not None and not isinstance(blocks_cache, (KVCache, _TransformersCacheView)):
            raise TypeError(f"cache must be a transformers Cache or a model.decoder.KVCache, got {type(cache).__name__}")
        h = self.splice_images(self.embed(input_ids), input_ids, image_features)
        h = self.run_blocks(h, blocks_cache, attention_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        out = self.logits_and_loss(h, mask_padding_labels(labels, attention_mask))
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits,
                                      cache=cache if isinstance(cache, Cache) else None)


# Any other method of the native classes (a helper the borrowed ones call) is borrowed as well, unless transformers
# or this class already has the name: the forward pass stays the native one as model/ changes.
for _native in (MiniMindVLM, MiniMindLM):
    for _name, _member in vars(_native).items():
        if callable(_member) and not _name.startswith("__") and not hasattr(MiniMindVLMForCausalLM, _name):
            setattr(MiniMindVLMForCausalLM, _name, _member)


class _TransformersCacheView:
    """A transformers Cache through the interface the native attention uses (`length`, `store`).

    It holds no padding mask (key_mask None): with a transformers cache the attention_mask covers the whole
    sequence at every step, as generate() passes it.
    """

    key_mask = None

    def __init__(self, cache: Cache):
        self.cache = cache
        self.length = cache.get_seq_length()

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)


class _ColumnBlock:
    """The weights of linears that read the same input as column blocks of one contiguous matrix [in, sum(out)]:
    each linear's weight becomes a view of its columns (a StackedLinear), and at inference the first of them to see
    an input multiplies it by the whole block once; the others take their columns of that product."""

    def __init__(self, linears: list[nn.Linear]):
        self.block = torch.cat([lin.weight.t() for lin in linears], dim=1).contiguous()
        self.widths = [lin.out_features for lin in linears]
        self._input: Optional[tuple[torch.Tensor, int]] = None  # (input, its version), held while its outputs wait
        self._outputs: list[Optional[torch.Tensor]] = []
        start = 0
        for index, lin in enumerate(linears):
            lin.weight.data = self.block[:, start:start + lin.out_features].t()  # the same Parameter, a view now
            lin.__class__ = StackedLinear
            lin.__dict__["_column_block"], lin.__dict__["_block_index"] = self, index  # not a submodule
            start += lin.out_features

    def holds(self, weight: torch.Tensor) -> bool:
        """Whether `weight` is still a view of this block (moving or casting the model replaces its storage)."""
        return weight.untyped_storage().data_ptr() == self.block.untyped_storage().data_ptr() and \
            weight.dtype == self.block.dtype and weight.device == self.block.device

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Linear `index`'s output for x: its columns of x @ block, computed once per input (an input changed in
        place since counts as new)."""
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        if self._input is None or self._input[0] is not x or self._input[1] != version:
            self._input = (x, version)
            self._outputs = list(torch.matmul(x, self.block).split(self.widths, dim=-1))
        out, self._outputs[index] = self._outputs[index], None
        if out is None:  # asked twice for the same input: compute it again
            self._input = None
            return self.output(index, x)
        if all(o is None for o in self._outputs):
            self._input = None  # every output taken: hold nothing between steps
        return out


class StackedLinear(nn.Linear):
    """An nn.Linear whose weight is a column block of a _ColumnBlock: same parameters, names and shapes. Without
    gradients (inference) its output comes from the block's one product; with them, or once the weight no longer
    lives in the block, it is the plain F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.__dict__.get("_column_block")
        if block is None or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
                or not block.holds(self.weight):
            return F.linear(x, self.weight, self.bias)
        return block.output(self.__dict__["_block_index"], x)
