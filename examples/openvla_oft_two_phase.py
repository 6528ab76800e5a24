"""Train an energy verifier beside an OpenVLA-OFT policy with the separated two-phase update.

The same model, LoRA, data loader and checkpoints as OFT's ``vla-scripts/finetune.py``, with
its flags (same names, same defaults where they mean the same thing); what changes is the
training loop: ``energy_train.train`` runs phase 1 (OFT's L1 step on LoRA + head + proprio
projector) and phase 2 (a no-grad forward with the updated weights, then the energy step).

    # with OFT's repository installed (its prismatic package importable), 8 GPUs:
    torchrun --standalone --nnodes 1 --nproc-per-node 8 examples/openvla_oft_two_phase.py \\
        --vla_path openvla/openvla-7b --data_root_dir /data/rlds --dataset_name libero_spatial_no_noops \\
        --run_root_dir runs --use_proprio True --num_images_in_input 2 --batch_size 8 \\
        --learning_rate 5e-4 --max_steps 150005 --save_freq 10000 --lora_rank 32

    # here, on the CPU, with the tiny random-weight stand-in (nothing downloaded):
    python examples/openvla_oft_two_phase.py --standin --max_steps 200

Flag by flag against finetune.py:

    vla_path, data_root_dir, dataset_name,       as in finetune.py (model, RLDS dataset, processor,
    shuffle_buffer_size, image_aug,              collator, DataLoader built the same way)
    num_images_in_input, use_proprio, use_film
    run_root_dir, run_id_note                    <run_root_dir>/<run id>: the energy-train run
                                                 directory; OFT-layout checkpoints in <run>/oft/step_N/
    batch_size                                   per GPU, as in OFT (run.batch_size = batch_size x GPUs)
    grad_accumulation_steps                      run.grad_accum
    learning_rate                                optim.lr (theta: LoRA + head + proprio projector)
    lr_warmup_steps                              optim.warmup_steps (linear from 0, OFT's from 10%)
    num_steps_before_decay                       OFT's MultiStepLR x0.1 has no equivalent: the
                                                 schedule is constant (or --schedule cosine)
    max_steps, save_freq                         run.steps, run.ckpt_every
    use_lora, lora_rank, lora_dropout            apply_lora: OFT's LoraConfig (all-linear, alpha = min(r, 16))
    resume, resume_step                          start from an OFT checkpoint directory, as OFT
                                                 resumes: --vla_path = the directory, its MERGED
                                                 model + a fresh zero-effect LoRA (OFT's way); or
                                                 with --resume_base_vla BASE: the base model + the
                                                 directory's lora_adapter/ (the same adapter trains
                                                 on). Never the adapter on the merged model. Head,
                                                 projector (+ FiLM backbone) from the directory.
                                                 --resume_run continues an interrupted energy-train
                                                 run (optimizers, step, energy model)
    wandb_entity, wandb_project                  run.log = "wandb" (WANDB_ENTITY / WANDB_PROJECT)
    use_l1_regression                            always (the energy phase reads the L1 head's rows)
    use_diffusion, merge_lora_during_training    not supported / merge offline with OFT's
                                                 merge_lora_weights_and_save.py
    energy_learning_rate, energy_warm_steps      the energy fork's flags: optim.energy_lr, and phi's
                                                 optimizer step SKIPPED for the first
                                                 energy_warm_steps micro-batches, as the fork does
                                                 (optim.energy_skip_steps = energy_warm_steps //
                                                 grad_accumulation_steps optimizer steps)
    (new) strategy, energy_loss, context,        run.strategy, energy.loss, OFTPolicy(context=...),
    energy_output, energy_loss_warmup_steps      energy.output (default the fork's bounded
                                                 sigmoid(0.5 x) * 2 + 0.1, per step), energy.
                                                 warmup_steps (a 0 -> 1 ramp of the energy loss's
                                                 weight: phi still steps)

The energy model is the fork's final EnergyModel(llm_dim, 7) (hidden 512, 8 heads, its bounded
output per step, fp32, its own AdamW, grads clipped to 1.0): an energy_model--N_checkpoint.pt
written here loads into the fork's class, and the fork's into ``EnergyModel(D, 7,
fork_version="final")`` (``energy_train.models.load_fork_energy`` for every fork version).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import energy_train as et
from energy_train.config import default_config
from energy_train.integrations.openvla_oft import (OFTPolicy, apply_lora, load_oft_checkpoint,
                                                   resume_vla)


def flag(v: str) -> bool:
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--standin", action="store_true", help="the tiny random-weight OFT stand-in (CPU, no download)")
    a("--vla_path", default="openvla/openvla-7b")
    a("--data_root_dir", type=Path, default=Path("datasets/rlds"))
    a("--dataset_name", default="aloha_scoop_x_into_bowl")
    a("--run_root_dir", type=Path, default=Path("runs"))
    a("--shuffle_buffer_size", type=int, default=100_000)
    a("--use_film", type=flag, default=False)
    a("--num_images_in_input", type=int, default=None, help="default 1 (2 with --standin)")
    a("--use_proprio", type=flag, default=None, help="default False (True with --standin)")
    a("--batch_size", type=int, default=8)
    a("--learning_rate", type=float, default=5e-4)
    a("--lr_warmup_steps", type=int, default=0)
    a("--num_steps_before_decay", type=int, default=100_000)
    a("--grad_accumulation_steps", type=int, default=1)
    a("--max_steps", type=int, default=200_000)
    a("--save_freq", type=int, default=10_000)
    a("--image_aug", type=flag, default=True)
    a("--use_lora", type=flag, default=True)
    a("--lora_rank", type=int, default=None, help="default 32 (16 with --standin)")
    a("--lora_dropout", type=float, default=0.0)
    a("--resume", type=flag, default=False, help="start from the OFT checkpoint directory at "
      "--vla_path (its merged model + a fresh LoRA, as OFT resumes)")
    a("--resume_step", type=int, default=None)
    a("--resume_base_vla", default=None, help="with --resume: the base model the checkpoint's "
      "lora_adapter/ was trained on; the adapter goes on it (no merged model needed)")
    a("--run_id_note", default=None)
    a("--wandb_entity", default=None)
    a("--wandb_project", default=None)
    # the energy phase
    a("--strategy", default="two_phase", choices=["two_phase", "shared_forward", "joint"])
    a("--energy_learning_rate", type=float, default=5e-4)
    a("--energy_warm_steps", type=int, default=0, help="the fork's: no energy optimizer step "
      "for the first N micro-batches")
    a("--energy_loss_warmup_steps", type=int, default=0, help="ramp the energy loss's weight "
      "0 -> 1 over N steps (phi still steps)")
    a("--energy_output", default="sigmoid", choices=["sigmoid", "unbounded", "softplus"],
      help="the energy's output transform, per step (default: the fork's bounded one)")
    a("--energy_loss", default="swap", choices=["swap", "explicit", "margin"])
    a("--context", default="fork", choices=["fork", "prompt"])
    a("--schedule", default="constant", choices=["constant", "cosine"])
    a("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 (fp32 with --standin)")
    a("--resume_run", action="store_true", help="continue the interrupted energy-train run of "
      "this command (its run directory), from its last checkpoint")
    args = p.parse_args(argv)
    for name, real, standin in (("num_images_in_input", 1, 2), ("use_proprio", False, True),
                                ("lora_rank", 32, 16), ("precision", "bf16", "fp32")):
        if getattr(args, name) is None:
            setattr(args, name, standin if args.standin else real)
    return args


def build_oft(args, device):
    """The VLA, L1 head, proprio projector and RLDS DataLoader exactly as finetune.py builds
    them (OFT's repository must be importable)."""
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForVision2Seq, AutoProcessor

    from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
    from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
    from prismatic.extern.hf.processing_prismatic import PrismaticImageProcessor, PrismaticProcessor
    from prismatic.models.action_heads import L1RegressionActionHead
    from prismatic.models.backbones.llm.prompting import PurePromptBuilder
    from prismatic.models.projectors import ProprioProjector
    from prismatic.util.data_utils import PaddedCollatorForActionPrediction
    from prismatic.vla.action_tokenizer import ActionTokenizer
    from prismatic.vla.constants import ACTION_DIM, PROPRIO_DIM
    from prismatic.vla.datasets import RLDSBatchTransform, RLDSDataset

    AutoConfig.register("openvla", OpenVLAConfig)
    AutoImageProcessor.register(OpenVLAConfig, PrismaticImageProcessor)
    AutoProcessor.register(OpenVLAConfig, PrismaticProcessor)
    AutoModelForVision2Seq.register(OpenVLAConfig, OpenVLAForActionPrediction)
    processor = AutoProcessor.from_pretrained(args.vla_path, trust_remote_code=True)

    def load(path):
        m = AutoModelForVision2Seq.from_pretrained(path, torch_dtype=torch.bfloat16,
                                                   low_cpu_mem_usage=True, trust_remote_code=True)
        m.vision_backbone.set_num_images_in_input(args.num_images_in_input)
        return m.to(device)

    vla = start_vla(args, load)
    if args.use_film:
        from prismatic.models.film_vit_wrapper import FiLMedPrismaticVisionBackbone
        vla.model.vision_backbone = FiLMedPrismaticVisionBackbone(
            vision_backbone=vla.model.vision_backbone, llm_dim=vla.llm_dim).to(device)
    llm_dim = vla.llm_dim
    head = L1RegressionActionHead(input_dim=llm_dim, hidden_dim=llm_dim, action_dim=ACTION_DIM)
    projector = ProprioProjector(llm_dim=llm_dim, proprio_dim=PROPRIO_DIM) if args.use_proprio else None
    if args.resume:
        load_oft_checkpoint(args.vla_path, action_head=head, proprio_projector=projector,
                            vision_backbone=(vla.model.vision_backbone if args.use_film else None),
                            step=args.resume_step)
    head = head.to(torch.bfloat16).to(device)  # as finetune.py: the head in bf16
    projector = projector.to(device) if projector is not None else None

    action_tokenizer = ActionTokenizer(processor.tokenizer)
    transform = RLDSBatchTransform(action_tokenizer, processor.tokenizer,
                                   image_transform=processor.image_processor.apply_transform,
                                   prompt_builder_fn=PurePromptBuilder,
                                   use_wrist_image=args.num_images_in_input > 1,
                                   use_proprio=args.use_proprio)
    dataset = RLDSDataset(args.data_root_dir, args.dataset_name, transform,
                          resize_resolution=tuple(vla.config.image_sizes),
                          shuffle_buffer_size=args.shuffle_buffer_size, image_aug=args.image_aug)
    collator = PaddedCollatorForActionPrediction(processor.tokenizer.model_max_length,
                                                 processor.tokenizer.pad_token_id, padding_side="right")
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=None, collate_fn=collator,
                        num_workers=0)  # RLDS has its own parallelism
    policy = OFTPolicy(vla, head, projector, use_film=args.use_film, context=args.context,
                       dataset_statistics=dataset.dataset_statistics, processor=processor)
    return policy, loader


def start_vla(args, load):
    """The VLA to train: ``load(path)`` loads a model directory. With --resume as OFT resumes
    (``resume_vla``: the checkpoint's merged model + a fresh LoRA, or with --resume_base_vla
    the base model + the checkpoint's adapter - never the adapter on the merged model);
    otherwise --vla_path with OFT's LoRA (--use_lora)."""
    if args.resume:
        return resume_vla(args.vla_path, load, base=args.resume_base_vla,
                          rank=args.lora_rank, dropout=args.lora_dropout)
    vla = load(args.vla_path)
    return apply_lora(vla, rank=args.lora_rank, dropout=args.lora_dropout) if args.use_lora else vla


def build_standin(args, device):
    """The stand-in VLA / head / projector, and its episodes through OFT's collator and a
    DataLoader: the same path as build_oft, with nothing downloaded. --resume works as with
    OFT's model (``StandinVLA.from_pretrained`` loads a directory)."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    from energy_train.integrations.openvla_oft import standin
    policy = standin.make_standin(0, num_images=max(1, min(2, args.num_images_in_input)),
                                  proprio=args.use_proprio,
                                  lora_rank=args.lora_rank if args.use_lora else 0,
                                  context=args.context)
    if args.resume:
        vla = start_vla(args, lambda path: standin.StandinVLA.from_pretrained(path))
        load_oft_checkpoint(args.vla_path, action_head=policy.action_head,
                            proprio_projector=policy.proprio_projector, step=args.resume_step)
        policy = OFTPolicy(vla, policy.action_head, policy.proprio_projector, context=args.context,
                           action_token_begin_idx=standin.ACTION_TOKEN_BEGIN_IDX,
                           pad_token_id=standin.PAD_TOKEN_ID)
    for m in policy.modules().values():
        m.to(device)
    dataset = standin.StandinEpisodes(96, 16, seed=0, wrist=args.num_images_in_input > 1)
    collator = standin.PaddedCollatorForActionPrediction(512, standin.PAD_TOKEN_ID, padding_side="right")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sampler = (DistributedSampler(dataset, num_replicas=world, rank=int(os.environ["RANK"]), seed=0)
               if world > 1 else RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collator,
                        num_workers=0, drop_last=True)  # each rank its own share of the episodes
    return policy, loader


def run_id(args) -> str:
    """finetune.py's run id, with the energy phase's strategy."""
    name = "standin" if args.standin else args.vla_path.rstrip("/").split("/")[-1]
    rid = (f"{name}+{'standin_reach' if args.standin else args.dataset_name}"
           f"+b{args.batch_size * args.grad_accumulation_steps}+lr-{args.learning_rate}")
    if args.use_lora:
        rid += f"+lora-r{args.lora_rank}+dropout-{args.lora_dropout}"
    rid += f"--energy-{args.strategy}-{args.context}"
    return rid + (f"--{args.run_id_note}" if args.run_id_note else "")


def main(argv=None) -> int:
    args = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    policy, loader = (build_standin if args.standin else build_oft)(args, device)
    if args.wandb_project:
        os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
    if args.wandb_entity:
        os.environ.setdefault("WANDB_ENTITY", args.wandb_entity)
    cfg = make_config(args, world, device)
    res = et.train(cfg, policy=policy, data=loader, out=args.run_root_dir / run_id(args),
                   resume=args.resume_run)
    return 0 if res.complete else 1


def make_config(args, world: int, device):
    """The energy-train config of these flags (the fork's energy recipe for the energy side)."""
    return default_config(**{
        "run.steps": args.max_steps, "run.batch_size": args.batch_size * world,
        "run.grad_accum": args.grad_accumulation_steps, "run.strategy": args.strategy,
        "run.precision": args.precision, "run.ckpt_every": args.save_freq if args.save_freq < args.max_steps else 0,
        "run.log_every": 10, "run.probe_every": 10, "run.device": str(device),
        "run.log": "wandb" if args.wandb_project else "none",
        "optim.lr": args.learning_rate, "optim.warmup_steps": args.lr_warmup_steps,
        "optim.schedule": args.schedule, "optim.energy_lr": args.energy_learning_rate,
        "optim.grad_clip": 0.0, "optim.energy_grad_clip": 1.0,
        "optim.energy_skip_steps": args.energy_warm_steps // args.grad_accumulation_steps,
        "energy.loss": args.energy_loss, "energy.warmup_steps": args.energy_loss_warmup_steps,
        "energy.output": args.energy_output,
        "energy.hidden": 64 if args.standin else 512, "energy.heads": 4 if args.standin else 8,
        "dist.find_unused_parameters": True})


if __name__ == "__main__":
    sys.exit(main())
