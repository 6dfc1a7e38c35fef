"""The network and its files.

  config.py      LMConfig and the two published sizes (PRESETS)
  decoder.py     the MiniMind text decoder: RMSNorm, RoPE, GQA attention, SwiGLU/MoE, blocks, loss
  vlm.py         MiniMindVLM: the projection, the splice of image features into the placeholder span, generation
  vision.py      the frozen CLIP vision tower, image decoding and preprocessing
  tokenizer.py   tokenizer loading, fingerprints, the chat template and the image placeholder ids
  checkpoint.py  checkpoint reading and writing (strict), config inferred from shapes, tokenizer pairing
  hf_model.py, processing_minimind_v.py   the transformers wrappers shipped with an export

Nothing here imports the data pipeline, the trainer or the inference code (tests/test_layout.py checks it).
"""
