"""Training: typed run config, the Trainer loop, atomic checkpoints, DDP/FSDP2, optimiser and schedule.

from lmm.training import TrainConfig, Trainer, train, load_train_config
train(load_train_config("configs/instruct_lora.yaml", ["schedule.max_steps=100"]))
Trainer(model, cfg, batches, evaluate=None).fit()     # any resumable batch source
"""

from lmm.training.config import TrainConfig, load_train_config
from lmm.training.run import build_model, train
from lmm.training.trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = ["TrainConfig", "load_train_config", "Trainer", "TrainResult", "NonFiniteLossError", "train", "build_model"]
