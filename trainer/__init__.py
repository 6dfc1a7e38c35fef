"""The training loop both stages share (1-pretrain_vlm.py, 2-sft_vlm.py) and its pieces.

  config.py       the flags, the two stages' defaults, output paths
  loop.py         the loop: build the run, step, log, validate, save, resume
  step.py         one optimizer step, the LR schedule, freezing, autocast and optimizer setup
  state.py        TrainState: optimizer, scaler, position, RNG states; save and exact resume
  metrics.py      throughput, MFU, the progress line
  distributed.py  torchrun/DDP setup and collectives
  validation.py   validation while training

Imports the network (model/) and the data pipeline (data_pipeline/), never the inference code.
"""
