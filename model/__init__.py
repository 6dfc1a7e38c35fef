"""The network, read top to bottom in one sitting.

  config.py        LMConfig and the two published sizes (PRESETS); `generation` "v1" (default) or "3v"
  decoder.py       the MiniMind text decoder: RMSNorm, RoPE, the attention layout (positions and masks), GQA
                   attention, blocks, loss
  rope.py          3v's rotary pieces: the rotate-half form and YaRN frequencies
  feed_forward.py  SwiGLU and its mixture-of-experts form
  vision.py        the frozen vision tower (v1 CLIP, 3v SigLIP2): loading, preprocessing a decoded image, features
  vlm.py           MiniMindVLM: the projection, the splice of image features into the placeholder span, generation

Nothing here imports the rest of the project, and nothing here exists for one runtime: the CPU inference paths
(inference/cpu/) replace modules from the outside with modules of the same interface (tests/test_layout.py).
"""
