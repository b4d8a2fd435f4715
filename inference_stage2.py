"""DiffDehaze (stage 2): dehaze every image of a folder with the 50-step spaced sampler (or the solver named by
``inference.sampler`` / ``inference.steps``).

    python inference_stage2.py --config configs/inference/stage2.yaml [--set inference.seed=1 ...]
"""
from pipelines.stage2 import main

if __name__ == "__main__":
    main()
