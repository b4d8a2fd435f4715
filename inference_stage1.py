"""HazeGen (stage 1): turn every clean image of a folder into ``num_samples`` realistic hazy variants.

Blended sampling (published): prompt "hazy, foggy, misty, obscure, smoggy."; the unconditional branch uses the same
text with an all-zero condition latent, mixed as ``uncond + w·(cond − uncond)`` with ``inference.w`` = 0.85. That
branch is the model's one rule (``ControlLDM.image_condition``), also applied to the unconditional (real-photo)
training samples: with YCbCr fusion it gets the YCbCr features of an all-zero image.
Outputs are ``<stem>_<k>.png`` (k = 0..num_samples−1), the names the stage-2 paired dataset reads.

HCD-YC dynamic prompts / text processor: training analyses the hazy *target*, which inference does not have, so
variant k analyses a hazy reference photo from ``inference.fog_reference_folder`` (chosen by the image stem and k)
and describes the haze to generate like it; without that folder those options are refused at start-up.

    python inference_stage1.py --config configs/inference/stage1.yaml [--set inference.num_samples=4]
"""
from pipelines.stage1 import main

if __name__ == "__main__":
    main()
