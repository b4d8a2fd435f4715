"""One-step DiffDehaze: the stage-2 model with the adapters of a stage-3 distillation merged in, one network
evaluation per image.

    python inference_onestep.py --config configs/inference/stage2_onestep.yaml [--set inference.adapter_path=...]
"""
from pipelines.onestep import main

if __name__ == "__main__":
    main()
