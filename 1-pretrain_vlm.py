"""Stage 1: align the projection (and, by default, the LLM) on image-caption pairs.

    python 1-pretrain_vlm.py [--preset minimind-v-small|minimind-v] [--feature_cache out/feature_cache]
    torchrun --nproc_per_node 2 1-pretrain_vlm.py ...

Starts from out/{dim}{_moe}_llm.pth (the MiniMind LLM) and writes out/{dim}{_moe}_vlm_pretrain.pth.
"""
from trainer.config import PRETRAIN
from trainer.loop import main

if __name__ == "__main__":
    main(PRETRAIN)
