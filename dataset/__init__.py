"""Training datasets: stage-1 hybrid synthetic/real data, stage-2 static pairs, and the CrossDehaze channel
transfer wrapper."""
from dataset.checks import DataError
from dataset.degradation import DegradationParams, degrade, haze_formula
from dataset.hybrid import STAGE1_PROMPT, HybridTrainingData
from dataset.paired import STAGE2_PROMPT, StaticPairedData
from dataset.transfer import ChannelTransfer

__all__ = [
    "ChannelTransfer",
    "DataError",
    "DegradationParams",
    "HybridTrainingData",
    "STAGE1_PROMPT",
    "STAGE2_PROMPT",
    "StaticPairedData",
    "degrade",
    "haze_formula",
]
