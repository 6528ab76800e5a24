"""The embedded default, ``--policy tiny``: one home for the toy policy.

    model.py    TinyVLA: patches + proprio + instruction + H*Da action slots + stop through a
                small pre-LN transformer, per-layer hidden states (ActionRowCapture: hooks)
    task.py     the procedural reach-and-grasp task with its scripted expert (TaskData: a
                step-indexed source, exact resume)
    policy.py   TinyPolicy (the model + OFT's L1 head behind the Policy interface), its
                [policy] options (TinyOptions) and the factory ``build``
"""
from .model import ActionRowCapture, Layout, TinyVLA, TinyVLAOutput
from .policy import TinyOptions, TinyPolicy, build
from .task import TaskData, generate_scenes, scripted_expert

__all__ = ["TinyVLA", "TinyVLAOutput", "Layout", "ActionRowCapture", "TinyPolicy", "TinyOptions",
           "build", "TaskData", "generate_scenes", "scripted_expert"]
