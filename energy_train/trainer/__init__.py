"""The lean trainer: two optimizers over disjoint parameter sets, one loop, strategy objects."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .core import Forward, Trainer, build_models, resolve_device
from .run import RunError, RunResult, is_complete, read_metrics, summarize, summary_table, train
from .strategies import STRATEGIES, Strategy, make_strategy

__all__ = ["Trainer", "Forward", "build_models", "resolve_device", "train", "RunResult",
           "RunError", "is_complete", "read_metrics", "summarize", "summary_table", "STRATEGIES",
           "Strategy", "make_strategy", "save_checkpoint", "load_checkpoint", "CheckpointError"]
