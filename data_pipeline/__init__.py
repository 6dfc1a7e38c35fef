"""The data pipeline: records (JSON, JSONL, parquet) -> token ids, labels and images -> batches.

  records.py        the one check on a data file's path; reading JSON/JSONL; the checks on each record; DataError
  parquet.py        parquet rows in the current MiniMind-V layout, read one row group at a time
  image_decode.py   decoding image files and bytes to RGB: the one boundary for untrusted images, Pillow's limits
  images.py         where a record's images are (files under --images_path, or parquet cells)
  tokens.py         a record's messages -> token ids with image placeholders and answer-only labels
  v3_tokens.py      minimind-3v records -> ids and labels as upstream's dataset makes them (64 x <|image_pad|>)
  packing.py        --pack_same_image: several questions about the same images in one row
  dataset.py        VLMDataset, the typed Batch and batch-longest collate
  feature_store.py  the frozen-CLIP feature cache and batch_features (a batch's images -> features)
  samplers.py       the shuffled and the length-grouped orders, both resumable mid-epoch

Imports only the network (model/). The user's data files live in dataset/, which holds no code.
"""
