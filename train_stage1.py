"""HazeGen (stage 1) training: the IRControlNet learns to turn clean images into realistic hazy ones.

    accelerate launch train_stage1.py --config configs/train/stage1.yaml [--set train.batch_size=8 ...]

Published recipe (HybridTrainingData with p = 0.3, AdamW lr 1e-5, global batch 16, 5k steps); see training/trainer.py and
docs/training.md for resume, mixed precision, multi-process and the HCD-YC extension switches.
"""
from training.trainer import main

if __name__ == "__main__":
    main(stage=1, default_config="configs/train/stage1.yaml")
