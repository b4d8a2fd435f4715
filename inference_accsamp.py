"""DiffDehaze with AccSamp: AlignOp estimate after phase 1, restart at (1−ω)·N with DCP-weighted MS-SSIM guidance.

    python inference_accsamp.py --config configs/inference/stage2_accsamp.yaml --set inference.tau=0.8 inference.omega=0.6
"""
from pipelines.accsamp import main

if __name__ == "__main__":
    main()
