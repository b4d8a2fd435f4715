"""DiffDehaze (stage 2) training: the IRControlNet learns to dehaze, on HazeGen's hazy/clean pairs.

    accelerate launch train_stage2.py --config configs/train/stage2.yaml [--set train.resume=latest ...]

Published recipe (StaticPairedData, AdamW, global batch 16, 100k steps: lr 3e-5, then 1e-5 from step 50,001); see
training/trainer.py and docs/training.md for resume, mixed precision, multi-process and the HCD-YC extension switches.
"""
from training.trainer import main

if __name__ == "__main__":
    main(stage=2, default_config="configs/train/stage2.yaml")
