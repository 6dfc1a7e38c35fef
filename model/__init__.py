"""The network, read top to bottom in one sitting.

  config.py        LMConfig and the two published sizes (PRESETS)
  decoder.py       the MiniMind text decoder: RMSNorm, RoPE, the attention layout (positions and masks), GQA
                   attention, blocks, loss
  feed_forward.py  SwiGLU and its mixture-of-experts form
  vision.py        the frozen CLIP vision tower: loading, preprocessing a decoded image, features
  vlm.py           MiniMindVLM: the projection, the splice of image features into the placeholder span, generation

Nothing here imports the rest of the project, and nothing here exists for one runtime: the CPU inference paths
(inference/cpu/) replace modules from the outside with modules of the same interface (tests/test_layout.py).
"""
