"""Mini prior pretraining (beyond the paper): the VAE, then the UNet, on clean photos, written in the
v2-1_512-ema-pruned.ckpt layout so that train_stage1.py / train_stage2.py and the inference scripts load it as SD-2.1.

    python train_prior.py --config configs/mini/prior.yaml --set prior.clean_folder=DIR prior.out_path=FILE

Used by the CPU training chain (python -m tools.mini_chain); see training/prior.py and docs/mini_chain.md.
"""
from training.prior import main

if __name__ == "__main__":
    main()
