"""Feed-forward baseline dehazing (AOD-Net, MSCNN, DehazeFormer, DeblurGAN-style GAN) of a folder:
``inference.image_folder`` -> ``<stem>.png`` in ``inference.result_folder``.

    python inference_baseline.py --config configs/inference/baseline_aodnet.yaml [--set inference.checkpoint_path=...]

Unreadable images are skipped and reported; the exit status is 1 if any image failed.
"""
from pipelines.baseline import main

if __name__ == "__main__":
    main()
