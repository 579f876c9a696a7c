"""minifn: language-model training as pure functions over parameter trees."""

from minifn.config import ModelConfig, TrainConfig
from minifn.model import apply, init_params, num_params

__all__ = ["ModelConfig", "TrainConfig", "apply", "init_params", "num_params"]
