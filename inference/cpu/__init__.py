"""CPU inference paths, applied from the outside to a loaded model: each replaces modules of the network with
modules of the same interface, so the network (model/) does not know about them.

  prepare.py   --cpu_kernel / --quantize: what the apps call after loading a model
  kernels.py   the linear layers' kernel path, chosen by measurement; stacked projections
  compiled.py  the one-row decode step compiled with inductor
  quantize.py  int8 dynamic quantisation of the decoder's linear layers
"""
