"""Evaluation: how accurate a checkpoint is (speed benchmarks live in bench/).

  jobs.py               3-eval_chat.py's evaluation jobs (--eval_data, --benchmark): scores or one error line
  exact_match.py        batched greedy answers and exact match (validation while training shares it)
  held_out.py           exact-match accuracy on held-out questions (3-eval_chat.py --eval_data)
  images.py             images decoded at the vision tower's input size (bounded memory per batch)
  benchmarks.py         POPE and MMStar: running a checkpoint over a benchmark's questions
  benchmark_data.py     reading a benchmark's parquet files: rows, skips, repeated questions
  benchmark_sources.py  bench_source.json (where the files came from), checked before a run
  benchmark_scoring.py  how POPE and MMStar answers are read and scored
  benchmark_specs.py    what each benchmark is: its files, fields and published revision

Imports the network, the checkpoints, the data pipeline and inference's VLMChat; nothing imports it back except
the trainer's validation (exact_match.py only).
"""
