"""Ready data sources for a policy of your own (README "Bring your own policy").

:class:`TaskData` is the embedded task's step-indexed source (exact resume): ``batch(step,
rank, world)`` gives ``grad_accum`` micro-batches of ``batch_size / world`` samples, each a dict
``images (B, 3, R, R)``, ``proprio (B, 4)``, ``tokens (B, 4)`` (the instruction), ``actions
(B, H, 7)`` (the expert chunk) and ``ids (B,)``; ``probe()`` a held-out batch; ``check()`` the
start-up NaN check. Size it from the config in a factory::

    TaskData(cfg.run.seed, size=1024, probe_size=32, batch_size=cfg.run.batch_size,
             grad_accum=cfg.run.grad_accum, chunk=H, image_size=16, device=device)
"""
from .policies.tiny.task import TaskData, generate_scenes, scripted_expert

__all__ = ["TaskData", "generate_scenes", "scripted_expert"]
