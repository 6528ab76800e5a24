"""LoRA as OFT's fine-tuning configures it, and checkpoints in OFT's own file layout.

One OFT-layout checkpoint directory (what OFT's evaluation code reads, after OFT's
LoRA-merge script has merged the adapter into the base model there)::

    lora_adapter/                              peft save_pretrained (adapter_config.json + weights)
    action_head--{step}_checkpoint.pt          state_dict, keys prefixed "module." (DDP's, as OFT saves)
    proprio_projector--{step}_checkpoint.pt    same
    vision_backbone--{step}_checkpoint.pt      with FiLM only: the whole vision backbone
    energy_model--{step}_checkpoint.pt         the energy model's state_dict (unprefixed, as the energy fork saves it)
    dataset_statistics.json, processor files   when given

The trainer writes one per checkpoint at ``<run>/oft/step_<N>/`` beside its own
``<run>/checkpoints/`` (:meth:`OFTPolicy.save_extra`); :func:`load_oft_checkpoint` loads such
a directory (or one written by OFT's own fine-tuning) into fresh modules with strict keys.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ...models.action_head import strip_module_prefix

COMPONENTS = ("action_head", "proprio_projector", "vision_backbone", "energy_model")
PREFIXED = ("action_head", "proprio_projector")  # saved from inside DDP by OFT: "module." keys


def apply_lora(vla: nn.Module, rank: int = 32, alpha: int | None = None, dropout: float = 0.0,
               init: str | bool = "gaussian") -> nn.Module:
    """``peft.get_peft_model`` with OFT's LoraConfig: ``r=rank``, ``lora_alpha=min(rank, 16)``
    unless given, ``lora_dropout=dropout``, ``target_modules="all-linear"`` (every Linear of
    the vision towers, projector and LLM; not the LM head), ``init_lora_weights="gaussian"``.
    The base is frozen; only the adapters require grad."""
    import peft
    cfg = peft.LoraConfig(r=int(rank), lora_alpha=int(alpha if alpha else min(rank, 16)),
                          lora_dropout=float(dropout), target_modules="all-linear",
                          init_lora_weights=init)
    with warnings.catch_warnings():  # peft on transformers 5: a deprecation notice per call
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(vla, cfg)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "save_pretrained", None))


def oft_checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the trainer writes the OFT-layout checkpoint of ``step``."""
    return Path(run_dir) / "oft" / f"step_{int(step):07d}"


def _cpu_state(module_or_state) -> dict[str, torch.Tensor]:
    sd = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


ASIDE = ".previous-"  # the previous copy of a directory being re-saved


def save_oft_checkpoint(directory: str | Path, step: int, *, vla: nn.Module | None = None,
                        adapter_state: dict | None = None, action_head: nn.Module | None = None,
                        proprio_projector: nn.Module | None = None,
                        vision_backbone: nn.Module | None = None, energy=None,
                        dataset_statistics: dict | None = None, processor=None) -> Path:
    """Write the given parts in OFT's layout into ``directory`` (made in a temporary directory
    beside it, then renamed; a re-save first renames the previous copy aside, so a crash
    leaves the previous copy or the new one: ``load_oft_checkpoint`` reads the previous one
    from beside it, the next save puts it back first). ``vla``: a peft model
    (its adapter goes to ``lora_adapter/``; ``adapter_state`` = the values to write, keyed
    like the peft model's state_dict, e.g. gathered from FSDP shards; default its own).
    ``energy``: a module or a state_dict. Returns the directory."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    aside = _recover(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if vla is not None:
        if not is_peft(vla):
            raise ValueError(f"vla: expected a peft model (LoRA adapters) to save as lora_adapter/, "
                             f"got {type(vla).__name__}")
        kw = {} if adapter_state is None else {"state_dict": adapter_state}
        vla.save_pretrained(str(tmp / "lora_adapter"), **kw)
    parts = {"action_head": action_head, "proprio_projector": proprio_projector,
             "vision_backbone": vision_backbone, "energy_model": energy}
    for name, part in parts.items():
        if part is None:
            continue
        sd = _cpu_state(part)
        if name in PREFIXED:
            sd = {f"module.{k}": v for k, v in sd.items()}
        torch.save(sd, tmp / f"{name}--{int(step)}_checkpoint.pt")
    if dataset_statistics is not None:
        (tmp / "dataset_statistics.json").write_text(json.dumps(dataset_statistics, indent=2))
    if processor is not None:
        processor.save_pretrained(str(tmp))
    if final.exists():
        os.replace(final, aside)  # whole until the new copy is in place
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    return final


def _recover(final: Path) -> Path:
    """After a crash between a re-save's two renames only the previous copy, renamed aside,
    is left: put it back. A stale aside copy next to a complete directory goes. Returns the
    aside path."""
    aside = final.with_name(f"{ASIDE}{final.name}")
    if aside.is_dir():
        if final.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, final)
    return aside


def find_component(directory: str | Path, name: str, step: int | None = None) -> Path | None:
    """The one ``{name}--*checkpoint.pt`` file of an OFT checkpoint directory (``step``: that
    step's), None when there is none; more than one is an error (as OFT's own loader says)."""
    directory = Path(directory)
    if step is not None:
        p = directory / f"{name}--{int(step)}_checkpoint.pt"
        return p if p.is_file() else None
    found = sorted(p for p in directory.glob(f"{name}--*") if "checkpoint" in p.name)
    if len(found) > 1:
        raise ValueError(f"{directory}: expected one {name}--*checkpoint.pt, found "
                         f"{[p.name for p in found]}; pass step=")
    return found[0] if found else None


def load_oft_checkpoint(directory: str | Path, *, vla: nn.Module | None = None,
                        action_head: nn.Module | None = None,
                        proprio_projector: nn.Module | None = None,
                        vision_backbone: nn.Module | None = None, energy: nn.Module | None = None,
                        step: int | None = None) -> dict[str, Path]:
    """Load an OFT-layout checkpoint into the given modules with strict keys (the ``module.``
    prefix stripped). ``vla``: a peft model with the same LoRA config; its adapter weights
    are set from ``lora_adapter/`` and every adapter key must match. Returns {part: file}."""
    directory = Path(directory)
    aside = directory.with_name(f"{ASIDE}{directory.name}")
    if not directory.is_dir() and aside.is_dir():  # a re-save crashed between its renames
        directory = aside
    if not directory.is_dir():
        raise FileNotFoundError(f"OFT checkpoint: no directory {str(directory)!r}")
    loaded: dict[str, Path] = {}
    wanted = {"action_head": action_head, "proprio_projector": proprio_projector,
              "vision_backbone": vision_backbone, "energy_model": energy}
    for name, module in wanted.items():
        if module is None:
            continue
        path = find_component(directory, name, step)
        if path is None:
            raise FileNotFoundError(f"OFT checkpoint {directory}: no {name}--*checkpoint.pt")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(strip_module_prefix(sd), strict=True)
        loaded[name] = path
    if vla is not None:
        loaded["lora_adapter"] = _load_adapter(vla, directory / "lora_adapter")
    return loaded


def _load_adapter(vla: nn.Module, adapter_dir: Path) -> Path:
    import peft
    from safetensors.torch import load_file

    if not is_peft(vla):
        raise ValueError(f"vla: expected a peft model to load {adapter_dir} into, got "
                         f"{type(vla).__name__}")
    files = [adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"OFT checkpoint: no adapter weights in {adapter_dir}")
    sd = (load_file(str(path)) if path.suffix == ".safetensors"
          else torch.load(path, map_location="cpu", weights_only=True))
    want = set(peft.get_peft_model_state_dict(vla))
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        raise ValueError(f"{path}: the adapter does not match the model's LoRA layers (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    peft.set_peft_model_state_dict(vla, sd)
    return path


__all__ = ["apply_lora", "save_oft_checkpoint", "load_oft_checkpoint", "oft_checkpoint_dir",
           "find_component", "is_peft", "COMPONENTS"]
