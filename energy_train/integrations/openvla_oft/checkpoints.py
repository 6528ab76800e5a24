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

Two peft versions meet here: OFT's pin (0.11.1) and recent releases. Their ``"all-linear"``
differs (0.11.1 also wraps ``lm_head`` and every Conv2d whose name ends like a Linear's, e.g.
the patch embeddings' ``proj``; OFT's save then also writes ``lm_head.base_layer.weight``) and
recent releases write adapter_config.json keys that 0.11.1 rejects. So: the adapter config is
written in a form both read (:func:`portable_adapter_config`); :func:`load_lora_adapter` puts
an adapter saved under either onto a base model with the LoRA layers ITS config names; and
``load_oft_checkpoint(vla=...)`` into an existing peft model handles the ``lm_head`` / conv
keys present on one side only (see :func:`_load_adapter`). :func:`resume_vla` resumes as OFT
does: never the adapter on a merged model.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ...models.action_head import load_oft_state_dict

COMPONENTS = ("action_head", "proprio_projector", "vision_backbone", "energy_model")
PREFIXED = ("action_head", "proprio_projector")  # saved from inside DDP by OFT: "module." keys


def apply_lora(vla: nn.Module, rank: int = 32, alpha: int | None = None, dropout: float = 0.0,
               init: str | bool = "gaussian") -> nn.Module:
    """``peft.get_peft_model`` with OFT's LoraConfig: ``r=rank``, ``lora_alpha=min(rank, 16)``
    unless given, ``lora_dropout=dropout``, ``target_modules="all-linear"`` (every Linear of
    the vision towers, projector and LLM; recent peft leaves out the LM head, peft 0.11.1 -
    OFT's pin - also wraps ``lm_head``, which never gets a gradient from the L1 loss, and the
    patch-embedding convs), ``init_lora_weights="gaussian"`` (lora_B = 0: the adapter starts
    with no effect). The base is frozen; only the adapters require grad."""
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
        cfg_path = tmp / "lora_adapter" / "adapter_config.json"
        cfg_path.write_text(json.dumps(portable_adapter_config(json.loads(cfg_path.read_text())),
                                       indent=2, sort_keys=True))
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
    prefix stripped). ``vla``: a peft model with the same LoRA rank; its adapter values are
    set from ``lora_adapter/`` (saved under either peft: ``lm_head`` / conv entries present on
    one side only are handled as :func:`_load_adapter` says). To put an adapter on a base model
    instead: :func:`load_lora_adapter`. Returns {part: file}."""
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
        load_oft_state_dict(module, sd, strict=True, where=str(path))  # NaN/inf refused
        loaded[name] = path
    if vla is not None:
        loaded["lora_adapter"] = _load_adapter(vla, directory / "lora_adapter")
    return loaded


# ---- peft versions ------------------------------------------------------------------------------
#: LoraConfig's fields in peft 0.11.1 (OpenVLA-OFT's pin): what its from_pretrained accepts
PEFT_0_11_LORA_KEYS = frozenset((
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
    "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
    "target_modules", "task_type", "use_dora", "use_rslora"))
#: keys newer peft writes whose value here means "feature off" although it is not falsy
_INERT = {"qalora_group_size": 16, "megatron_core": "megatron.core"}


def _inert(key: str, value) -> bool:
    """A config value that switches nothing on: None, False, empty, a version stamp, or a
    known default of a feature flag."""
    return (value is None or value is False or value in ({}, [], "") or key == "peft_version"
            or _INERT.get(key, object()) == value)


def portable_adapter_config(config: dict, known=PEFT_0_11_LORA_KEYS, where: str = "") -> dict:
    """adapter_config.json without the keys that ``known`` (default: peft 0.11.1's LoraConfig
    fields) lacks and whose value switches nothing on, so peft 0.11.1 and recent releases
    both read it. A key ``known`` lacks with a value that does switch something on is kept
    when writing (``where`` empty: the old peft then fails loudly instead of dropping it) and
    is an error when reading (``where`` = the file)."""
    out = {}
    for k, v in config.items():
        if k in known or not _inert(k, v):
            if k not in known and where:
                raise ValueError(f"{where}: {k!r} = {v!r} is a LoRA setting the installed peft "
                                 "does not know (the adapter was saved by a newer peft with "
                                 "that feature on); load it with that peft")
            out[k] = v
    return out


def load_lora_adapter(vla: nn.Module, adapter_dir: str | Path, *, trainable: bool = True):
    """``peft.PeftModel.from_pretrained(vla, adapter_dir, is_trainable=trainable)`` for an
    adapter saved by either peft (OFT's 0.11.1 or a recent release): the LoRA layers are the
    ones the adapter's OWN config names (``lm_head`` and the patch-embedding convs when 0.11.1
    saved it), its config read through :func:`portable_adapter_config`. ``vla``: the BASE
    model (never a merged one: that would apply the adapter twice). Every adapter tensor must
    land in the model. Returns the peft model."""
    import peft
    import dataclasses

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"OFT checkpoint: no adapter_config.json in {adapter_dir}")
    if is_peft(vla):
        raise ValueError(f"vla: expected the base model (no LoRA) to put {adapter_dir} on, got a "
                         "peft model; use load_oft_checkpoint(vla=...) to set its adapter values")
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    raw = json.loads(cfg_file.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: expected a LoRA adapter (peft_type 'LORA'), got "
                         f"{raw.get('peft_type')!r}")
    config = peft.LoraConfig(**portable_adapter_config(raw, known, where=str(cfg_file)))
    model = peft.PeftModel.from_pretrained(vla, str(adapter_dir), config=config,
                                           is_trainable=trainable)
    sd = _read_adapter(adapter_dir)[1]
    missing = sorted(set(sd) - set(peft.get_peft_model_state_dict(model)))
    if missing:
        raise ValueError(f"{adapter_dir}: adapter tensors {missing[:3]} found no LoRA layer in "
                         "the model (another base model?)")
    return model


def resume_vla(checkpoint_dir: str | Path, load, *, base: str | Path | None = None,
               rank: int = 32, alpha: int | None = None, dropout: float = 0.0):
    """The VLA to continue training from an OFT-layout checkpoint directory, as OFT resumes:

    - ``base=None`` (OFT's finetune.py with ``--resume``): ``load(checkpoint_dir)`` is the
      MERGED model there (written by OFT's ``merge_lora_weights_and_save.py`` or
      ``merge_lora_during_training``), with a FRESH LoRA of ``rank`` on it (:func:`apply_lora`:
      lora_B = 0, so it starts as exactly the trained model);
    - ``base=PATH``: ``load(base)`` is the base model and ``checkpoint_dir/lora_adapter`` goes
      on it, trainable (:func:`load_lora_adapter`): the same adapter trains on.

    Never the adapter on the merged model (it would add the trained update twice).
    ``load(path) -> nn.Module`` loads a model directory (e.g. ``AutoModelForVision2Seq
    .from_pretrained`` with OFT's arguments). Returns the peft model."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"OFT checkpoint: no directory {str(ckpt)!r}")
    if base is None:
        if not (ckpt / "config.json").is_file():
            raise FileNotFoundError(
                f"resume: {ckpt} holds no merged model (config.json + weights): merge its "
                "lora_adapter/ into the base model there first (OFT's "
                "merge_lora_weights_and_save.py), or give the base model (base=, the example's "
                "--resume_base_vla) to put the adapter on")
        return apply_lora(load(str(ckpt)), rank=rank, alpha=alpha, dropout=dropout)
    if Path(base).resolve() == ckpt.resolve():
        raise ValueError(f"base: {base} is the checkpoint directory, whose model is the merged "
                         "one: the adapter on it would apply the trained update twice; give the "
                         "model the adapter was trained on")
    return load_lora_adapter(load(str(base)), ckpt / "lora_adapter", trainable=True)


def _read_adapter(adapter_dir: Path) -> tuple[Path, dict]:
    from safetensors.torch import load_file
    files = [adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"OFT checkpoint: no adapter weights in {adapter_dir}")
    sd = (load_file(str(path)) if path.suffix == ".safetensors"
          else torch.load(path, map_location="cpu", weights_only=True))
    return path, sd


def _lora_module(key: str) -> str | None:
    """The module path of a LoRA tensor key (``....q_proj.lora_A.weight`` -> ``....q_proj``)."""
    return key.split(".lora_", 1)[0] if ".lora_" in key else None


def _load_adapter(vla: nn.Module, adapter_dir: Path) -> Path:
    """Set the adapter values of the peft model ``vla`` from ``adapter_dir``. Where the file
    and the model's LoRA layers differ (the two peft versions' "all-linear"):
    - LoRA in the file for a module the model has none for: skipped when it has no effect
      (its lora_B is zero: ``lm_head``, which the L1 loss never trains), else an error that
      names the modules (put the adapter on the base model with :func:`load_lora_adapter`);
    - a saved embedding base layer (``lm_head.base_layer.weight``, OFT's save under 0.11.1):
      the frozen base, skipped when the model has no LoRA there;
    - LoRA of the model absent from the file: lora_B set to zero (no adapter there, as the
      file says); an absent base layer keeps the model's own.
    A module whose LoRA tensors disagree in shape (another rank) is an error."""
    import peft

    if not is_peft(vla):
        raise ValueError(f"vla: expected a peft model to load {adapter_dir} into, got "
                         f"{type(vla).__name__}")
    path, sd = _read_adapter(adapter_dir)
    own = peft.get_peft_model_state_dict(vla)
    extra = sorted(set(sd) - set(own))
    effective = sorted({_lora_module(k) for k in extra if _lora_module(k) is not None
                        and ".lora_B" in k and bool(sd[k].any())})
    if effective:
        raise ValueError(
            f"{path}: the adapter has non-zero LoRA on {len(effective)} module(s) the model's "
            f"LoRA does not wrap ({effective[:3]}; saved under another peft's 'all-linear'); "
            f"put the adapter on the base model with the layers its config names: "
            f"load_lora_adapter(base_vla, '{adapter_dir}')")
    other = [k for k in extra if _lora_module(k) is None and not k.endswith(".base_layer.weight")]
    if other:
        raise ValueError(f"{path}: tensors {other[:3]} are no LoRA tensor of the model")
    values = {}
    for k, v in own.items():
        if k in sd:
            if tuple(sd[k].shape) != tuple(v.shape):
                raise ValueError(f"{path}: {k!r}: expected shape {tuple(v.shape)} (the model's "
                                 f"LoRA), got {tuple(sd[k].shape)} (another rank?)")
            values[k] = sd[k]
        elif ".lora_B" in k or ".lora_embedding_B" in k:
            values[k] = torch.zeros_like(v)      # no adapter there in the file: no effect
        else:
            values[k] = v                        # lora_A (inert with B = 0) / the frozen base
    skipped = sorted({_lora_module(k) or k for k in extra})
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} entries the model's LoRA does not wrap, "
                      f"each without effect ({skipped[:3]})", stacklevel=3)
    zeroed = sorted({_lora_module(k) for k in set(own) - set(sd) if _lora_module(k)})
    if zeroed:
        warnings.warn(f"{path}: {len(zeroed)} LoRA module(s) of the model are not in the file "
                      f"(saved under another peft's 'all-linear'): set to no effect "
                      f"({zeroed[:3]})", stacklevel=3)
    peft.set_peft_model_state_dict(vla, values)
    return path


__all__ = ["apply_lora", "save_oft_checkpoint", "load_oft_checkpoint", "oft_checkpoint_dir",
           "find_component", "is_peft", "COMPONENTS", "load_lora_adapter", "resume_vla",
           "portable_adapter_config"]
