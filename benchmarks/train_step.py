"""Benchmark one Diffusion-DPO LoRA training step: ours against the published scripts' step.

    python benchmarks/train_step.py --family sd15 --size tiny
    python benchmarks/train_step.py --family sdxl --size full --device cuda --dtype bf16 --batch 1 \
        --gradient-checkpointing

Both variants build the family's UNet, VAE and text encoder(s) from the published configs (``--size full``) or
shrunk ones (``--size tiny``) with random weights (no download), attach the same LoRA (rank 4 on to_q/to_k/to_v/
to_out.0, fp32) and run the same loss, AdamW and batch of preference pairs (random pixels, one prompt per pair):

- ours (``safealign.training.step.preference_step``): latents and text embeddings encoded once and cached (as the
  render stage caches them); preferred and rejected in one batched forward; the reference is the same UNet with
  its adapters disabled, under no_grad.
- reference (Diffusion-DPO's train.py, as SafetyDPO's train.py runs it): every step VAE-encodes both images
  (posterior sample) and runs the text encoder(s); the preferred and rejected images go through the trained UNet
  in one forward, and through a second, full copy of the UNet for the reference.

Each variant runs in its own process (peak memory: see benchmarks/common.py). The last stdout line is one JSON
object with ours_pairs_per_s, reference_pairs_per_s, speedup, ours_peak_mib and reference_peak_mib.
"""
from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch  # noqa: E402  (common puts the repository root on sys.path first)
from common import DTYPES, PeakMemory, autocast, parser, run_variants, seconds_per_call, summary

from safealign.families import get_family  # noqa: E402
from safealign.families.base import Cond, cond_cat  # noqa: E402
from safealign.training import LOSSES  # noqa: E402
from safealign.training.losses import PreferenceBatch  # noqa: E402
from safealign.training.step import preference_step  # noqa: E402
from safealign.training.terms import per_sample_error  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
BETA = 5000.0


def setup(args: argparse.Namespace) -> tuple[Any, PeakMemory, dict[str, Any]]:
    meter = PeakMemory(args.device)
    fam = get_family(args.family).build_random(args.size, seed=0, device=args.device, dtype=DTYPES[args.dtype])
    if args.resolution:
        fam.image_size = args.resolution
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, fam.image_size, fam.image_size)
    batch = {"pixels_w": torch.rand(shape, generator=g).to(args.device),
             "pixels_l": torch.rand(shape, generator=g).to(args.device),
             "prompts": [f"an unsafe prompt number {i} with a few more words" for i in range(args.batch)]}
    return fam, meter, batch


def attach_lora(fam: Any, args: argparse.Namespace) -> torch.optim.Optimizer:
    fam.add_lora(4, 4.0, TARGETS)
    if args.gradient_checkpointing:
        fam.unet.enable_gradient_checkpointing()
    fam.unet.train()
    return torch.optim.AdamW(fam.lora_parameters(), lr=1e-5, weight_decay=1e-2)


def optimizer_step(fam: Any, opt: torch.optim.Optimizer, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(fam.lora_parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def measure(args: argparse.Namespace, fam: Any, meter: PeakMemory, step: Any) -> dict[str, Any]:
    sec = seconds_per_call(step, args.steps, args.warmup, args.device)
    return {"rate": args.batch / sec, "peak_mib": meter.peak_mib(), "memory_measure": meter.measure,
            "batch_pairs": args.batch, "resolution": fam.image_size,
            "gradient_checkpointing": args.gradient_checkpointing,
            "unet_params": sum(p.numel() for p in fam.unet.parameters() if not p.requires_grad),
            "steps_timed": args.steps}


def ours(args: argparse.Namespace) -> dict[str, Any]:
    fam, meter, batch = setup(args)
    opt = attach_lora(fam, args)
    scaler = torch.amp.GradScaler(enabled=args.dtype == "fp16")
    with torch.no_grad():  # cached once, as the render stage caches them
        x0_w, x0_l = fam.encode_images(batch["pixels_w"]), fam.encode_images(batch["pixels_l"])
        cond = fam.encode_prompts(batch["prompts"])
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        with autocast(args):
            out = preference_step(fam, x0_w, x0_l, cond, LOSSES.get("dpo"), BETA, gen)
        optimizer_step(fam, opt, out.loss, scaler)

    return measure(args, fam, meter, step)


def unet_forward(unet: Any, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
    return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=extra or None).sample


def reference(args: argparse.Namespace) -> dict[str, Any]:
    fam, meter, batch = setup(args)
    ref_unet = copy.deepcopy(fam.unet).requires_grad_(False).eval()  # the second full UNet
    opt = attach_lora(fam, args)
    scaler = torch.amp.GradScaler(enabled=args.dtype == "fp16")
    pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]]) * 2 - 1  # (2B, 3, H, W): preferred, then rejected
    b = args.batch

    def step() -> None:
        with torch.no_grad():  # VAE and text encoders at every step
            latents = fam.vae.encode(pixels.to(fam.vae_dtype)).latent_dist.sample()
            latents = (latents * fam.vae.config.scaling_factor).to(fam.dtype)
            cond = fam.encode_prompts(batch["prompts"])
        noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)  # one noise and one timestep per pair
        t = torch.randint(0, fam.num_train_timesteps, (b,), device=latents.device).repeat(2)
        noisy, target, cond2 = fam.add_noise(latents, noise, t), fam.target(latents, noise, t), cond_cat([cond, cond])
        with autocast(args):
            err_w, err_l = per_sample_error(unet_forward(fam.unet, noisy, t, cond2), target).chunk(2)
            with torch.no_grad():
                ref_w, ref_l = per_sample_error(unet_forward(ref_unet, noisy, t, cond2), target).chunk(2)
            losses = LOSSES.get("dpo")(PreferenceBatch(err_w, err_l, ref_w, ref_l), BETA).losses
        optimizer_step(fam, opt, losses.mean(), scaler)

    return measure(args, fam, meter, step)


def main() -> None:
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="preference pairs per step (SafetyDPO's SD 1.5 launcher: 4)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=0, help="pixels; 0 = the family's (tiny: 64)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    results = run_variants(args, {"ours": ours, "reference": reference})
    print(json.dumps(summary(args, results, "pairs_per_s")))


if __name__ == "__main__":
    main()
