"""Training: typed configs, the trainer, checkpoints, data-parallel setup.

from deltalearn.train import TrainConfig, train
cfg = TrainConfig(); cfg.model.variant = "ddl-cc"; cfg.run.out = "runs/ddl-cc"
result = train(cfg)
"""

from deltalearn.errors import CheckpointError, ConfigError, NonFiniteLossError, UserError
from deltalearn.train.config import TrainConfig, load_config, resolve_config, save_config
from deltalearn.train.trainer import Trainer, TrainResult, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "UserError",
    "load_config",
    "resolve_config",
    "save_config",
    "train",
]
