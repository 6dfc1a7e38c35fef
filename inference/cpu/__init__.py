"""CPU inference paths, applied from the outside to a loaded model: each replaces modules of the network with
modules of the same interface, so the network (model/) does not know about them.

  prepare.py   --cpu_kernel / --quantize: what the apps call after loading a model, and the choice among the paths
  kernels.py   the eager kernel paths of the linear layers, and auto's measured choice among them
  stacked.py   StackedQKVAttention and StackedSwiGLU: wq/wk/wv and w1/w3 stacked, swapped into the blocks
  compiled.py  the one-row decode step compiled with inductor, installed as the model's next_token_logits
  quantize.py  int8 dynamic quantisation of the decoder's linear layers
"""
