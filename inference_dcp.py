"""Classical DCP dehazing (He et al.) of a folder: ``inference.image_folder`` -> ``<stem>.png`` in
``inference.result_folder`` (haze.dcp.dcp_dehaze with the ``dcp`` section of the config).

    python inference_dcp.py --config configs/inference/dcp.yaml [--set dcp.omega=0.9 ...] [--skip-existing]

Unreadable images are skipped and reported; the exit status is 1 if any image failed.
"""
from pipelines.dcp import main

if __name__ == "__main__":
    main()
