"""The lean trainer: two optimizers over disjoint parameter sets, one loop, strategy objects."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, split_theta
from .core import Forward, Trainer, resolve_device
from .feed import Feed, Micro
from .run import RunError, RunResult, build_trainer, is_complete, read_metrics, summarize, summary_table, train
from .strategies import STRATEGIES, Blocks, Strategy, make_strategy
from .validate import PolicyError

__all__ = ["Trainer", "Forward", "Feed", "Micro", "resolve_device", "train", "build_trainer",
           "RunResult", "RunError", "is_complete", "read_metrics", "summarize", "summary_table",
           "STRATEGIES", "Strategy", "Blocks", "make_strategy", "save_checkpoint",
           "load_checkpoint", "split_theta", "CheckpointError", "PolicyError"]
