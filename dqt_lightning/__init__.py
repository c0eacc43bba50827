"""Direct Quantized Training of LLaMA models with PyTorch Lightning: integer-only weights, stochastic rounding."""

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import BitLinear, DQTLinear, quantized_parameters
from dqt_lightning.model import LLaMA, Config
from dqt_lightning.module import LanguageModel
from dqt_lightning.train.optim import AdamW
from dqt_lightning.train.precision import Execution, Method, QuantPrecision
from dqt_lightning.quant.grid import Grid, TernaryGrid
from dqt_lightning.quant.rounding import register_rounding
from dqt_lightning.train.update import QuantizedUpdate

__all__ = [
    "AdamW",
    "BitLinear",
    "Config",
    "ConfigError",
    "DQTLinear",
    "Execution",
    "Grid",
    "LLaMA",
    "LanguageModel",
    "Method",
    "QuantPrecision",
    "QuantizedUpdate",
    "TernaryGrid",
    "quantized_parameters",
    "register_rounding",
]
