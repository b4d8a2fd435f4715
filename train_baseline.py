"""Train a feed-forward dehazing baseline (AOD-Net, MSCNN, DehazeFormer, DeblurGAN-style GAN) with the one trainer.

    accelerate launch train_baseline.py --config configs/train/baseline_aodnet.yaml [--set train.resume=latest ...]

See training/baseline.py and docs/baselines.md.
"""
from training.baseline import main

if __name__ == "__main__":
    main()
