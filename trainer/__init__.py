"""The training loop both stages share (1-pretrain_vlm.py, 2-sft_vlm.py) and its pieces.

  config.py       the flags, the two stages' defaults, RunConfig (the flags resolved once), output paths
  flags.py        flags declared once on a dataclass's fields; the argparse parser generated from them
  build.py        the run's pieces: start checkpoint, model, data and sampler, validation set, wandb
  loop.py         the loop: step, log, validate, save, stop on a signal, resume
  step.py         one optimizer step, the LR schedule, freezing, autocast and optimizer setup
  state.py        TrainState: optimizer, scaler, position, RNG states, what shapes the order; save and exact resume
  metrics.py      throughput, MFU, the progress line
  distributed.py  torchrun/DDP setup and collectives
  validation.py   validation while training
  cpu_dtype.py    which dtype trains faster on this CPU (fp32 or bf16 autocast), measured
  seed.py         one seed for every random number generator a run draws from

Imports the network (model/) and the data pipeline (data_pipeline/), never the inference code.
"""
