"""Benchmark rendering: our ``Family.render`` against a plain diffusers pipeline loop.

    python benchmarks/render.py --family sd15 --size tiny
    python benchmarks/render.py --family sdxl --size full --device cuda --dtype fp16 --prompts 32 --steps 50

Both variants build the family from the published (``--size full``) or shrunk (``--size tiny``) configs with
random weights and render the same prompts from the same per-row seeds with the same sampler (DDIM, trailing
spacing) and guidance:

- ours: ``Family.render``, ``--batch-size`` prompts per batch, classifier-free guidance in one batched forward.
- reference: the diffusers pipeline called once per prompt, as SafetyDPO's inference.py does, with the start
  noise of the row's seed, so both must produce the same images (``max_abs_diff`` reports the largest uint8
  difference between them).

The last stdout line is one JSON object with ours_images_per_s, reference_images_per_s, speedup and the peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch  # noqa: E402  (common puts the repository root on sys.path first)
from common import DTYPES, PeakMemory, parser, run_variants, seconds_per_call, summary

from safealign.families import get_family  # noqa: E402


def setup(args: argparse.Namespace) -> tuple[Any, PeakMemory, list[str], list[int]]:
    meter = PeakMemory(args.device)
    fam = get_family(args.family).build_random(args.size, seed=0, device=args.device, dtype=DTYPES[args.dtype])
    prompts = [f"a photo of scene number {i}, with a few more words" for i in range(args.prompts)]
    return fam, meter, prompts, list(range(args.prompts))


def finish(args: argparse.Namespace, name: str, fam: Any, meter: PeakMemory, render: Any) -> dict[str, Any]:
    images: list[np.ndarray] = []
    sec = seconds_per_call(lambda: images.append(render()), 1, args.warmup, args.device)
    np.save(Path(os.environ["BENCH_OUT"]) / f"{name}.npy", images[-1])
    return {"rate": args.prompts / sec, "peak_mib": meter.peak_mib(), "memory_measure": meter.measure,
            "prompts": args.prompts, "steps": args.steps, "guidance": args.guidance, "batch_size": args.batch_size,
            "resolution": fam.image_size}


def ours(args: argparse.Namespace) -> dict[str, Any]:
    fam, meter, prompts, seeds = setup(args)
    return finish(args, "ours", fam, meter,
                  lambda: fam.render(prompts, seeds, args.steps, args.guidance, args.batch_size))


def reference(args: argparse.Namespace) -> dict[str, Any]:
    fam, meter, prompts, seeds = setup(args)
    pipe = fam.pipeline()  # the same modules and sampler, driven by diffusers' own loop
    pipe.set_progress_bar_config(disable=True)

    def render() -> np.ndarray:
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            noise = fam.initial_noise([seed]).to(args.device, fam.dtype)
            image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, latents=noise,
                         output_type="np").images
            out.append((image * 255).round().astype(np.uint8))
        return np.concatenate(out)

    with torch.no_grad():
        return finish(args, "reference", fam, meter, render)


def main() -> None:
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=8, help="ours: prompts per batch")
    ap.add_argument("--warmup", type=int, default=1, help="untimed renders before the timed one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"BENCH_OUT": os.environ.get("BENCH_OUT", tmp)}
        results = run_variants(args, {"ours": ours, "reference": reference}, env)
        out = summary(args, results, "images_per_s")
        a, b = (np.load(Path(env["BENCH_OUT"]) / f"{n}.npy").astype(int) for n in ("ours", "reference"))
        out["max_abs_diff"] = int(np.abs(a - b).max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
