"""Direct Quantized Training of LLaMA models with PyTorch Lightning: integer-only weights, stochastic rounding."""

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import BitLinear, DQTLinear, quantized_parameters
from dqt_lightning.model import LLaMA, Config
from dqt_lightning.module import LanguageModel
from dqt_lightning.train.optim import AdamW
from dqt_lightning.train.precision import QuantPrecision
from dqt_lightning.quant.grid import Grid, TernaryGrid, stochastic_round
from dqt_lightning.train.update import QuantizedUpdate

__all__ = [
    "AdamW",
    "BitLinear",
    "Config",
    "ConfigError",
    "DQTLinear",
    "Grid",
    "LLaMA",
    "LanguageModel",
    "QuantPrecision",
    "QuantizedUpdate",
    "TernaryGrid",
    "quantized_parameters",
    "stochastic_round",
]
