"""The data pipeline: records (JSON, JSONL, parquet) -> token ids, labels and images -> batches.

  records.py        the data-file check, reading JSON/JSONL, the checks on each record, SkipCounter, DataError
  parquet.py        parquet rows in the current MiniMind-V layout, read one row group at a time
  images.py         where a record's images are (files or parquet cells) and how one is opened
  tokens.py         a record's messages -> a Sample: token ids, answer-only labels, cut to max_seq_len
  packing.py        --pack_same_image: questions about the same images packed into one row of segments
  dataset.py        VLMDataset, the typed Batch and collate
  feature_store.py  the frozen-CLIP feature cache and batch_features (a batch's images -> features)
  samplers.py       the shuffled and the length-grouped orders, both resumable mid-epoch

Imports only the network (model/). The user's data files live in dataset/, which holds no code.
"""
