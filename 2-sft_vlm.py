"""Stage 2: instruction tuning on image question/answer conversations.

    python 2-sft_vlm.py [--preset minimind-v-small|minimind-v] [--multi_turn] [--feature_cache out/feature_cache]
    torchrun --nproc_per_node 2 2-sft_vlm.py ...

Starts from out/{dim}{_moe}_vlm_pretrain.pth and writes out/{dim}{_moe}_vlm_sft.pth.
"""
from trainer.config import SFT
from trainer.loop import main

if __name__ == "__main__":
    main(SFT)
