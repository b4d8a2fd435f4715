"""One-step DiffDehaze (stage 3): distil a trained DiffDehaze (stage 2) into a student that runs the denoiser once.

    accelerate launch train_stage3.py --config configs/train/stage3_onestep.yaml [--set train.resume=latest ...]

The release (``<exp_dir>/checkpoints/<step>.safetensors``) is the adapter file ``inference_onestep.py`` reads
(``inference.adapter_path``); see training/stage3.py and docs/onestep.md.
"""
from training.stage3 import main

if __name__ == "__main__":
    main()
