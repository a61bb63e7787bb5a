"""Benchmark of OpenMP's wait policy for the toy model: pretraining steps and DDIM rendering per second under
each policy, on a quiet machine and beside one busy core, at 2 threads and at 1, side by side in one run.

    python benchmarks/wait_policy.py                 # 30 pretraining steps and 2 renders of 128 images per cell
    python benchmarks/wait_policy.py --steps 60 --renders 4

The policies (environment of a fresh process, set before torch loads libgomp):
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE``: a thread at a barrier sleeps at once (futex);
- ``spin=N``: ``GOMP_SPINCOUNT=N`` with no wait policy: a thread spins N iterations, then sleeps;
- ``default``: neither set (libgomp spins 300000 iterations, then sleeps);
- ``active``: ``OMP_WAIT_POLICY=ACTIVE``: a thread spins until the work comes.
Each cell runs in its own process (the first steps and render are a warm-up, not timed); the busy cells start one
process that spins on one core. Run it on a machine doing nothing else.
Last stdout line: one JSON object {"<policy>": {"<threads>": {"quiet": {...}, "busy": {...}}}}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import burn  # noqa: E402  (one busy core, the same burner as the pipeline benchmark)

CHILD = r"""
import json, sys, time
import torch  # before safealign: the environment alone sets the policy
from safealign.core.params import load_params
from safealign.families.toy import ToyFamily
from safealign.toyworld.pretrain import draw_pool, pretrain
from safealign.toyworld.settings import toy_settings

threads, steps, renders, params_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
params = load_params(params_path)
toy, b, s = toy_settings(params), params.base, params.sampling
m = toy.model
fam = ToyFamily.build(image_size=toy.image_size, patch=m.patch, widths=m.widths, attention=m.attention,
                      text_dim=m.text_dim, layers_per_block=m.layers_per_block, seed=0)
pool = draw_pool(2048, toy.image_size, 0)
kw = dict(batch_size=b.batch_size, lr=b.lr, pool_size=0, caption_dropout=b.caption_dropout, seed=0,
          progress=False, pool=pool)
pretrain(fam, steps=3, **kw)  # warm-up
t0 = time.perf_counter()
pretrain(fam, steps=steps, **kw)
train_s = (time.perf_counter() - t0) / steps
prompts = pool[0][:s.batch_size]
fam.render(prompts, list(range(len(prompts))), s.steps, s.guidance, s.batch_size, progress=False)  # warm-up
t0 = time.perf_counter()
for _ in range(renders):
    fam.render(prompts, list(range(len(prompts))), s.steps, s.guidance, s.batch_size, progress=False)
render_s = (time.perf_counter() - t0) / renders
print(json.dumps({"train_step_s": round(train_s, 4), "render_batch_s": round(render_s, 3)}))
"""

POLICIES = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin=1000": {"GOMP_SPINCOUNT": "1000"},
    "spin=10000": {"GOMP_SPINCOUNT": "10000"},
    "spin=100000": {"GOMP_SPINCOUNT": "100000"},
    "default": {},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}


def cell(policy: dict[str, str], threads: int, steps: int, renders: int, params: str, busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(policy)
    burner = mp.Process(target=burn, daemon=True) if busy else None
    if burner:
        burner.start()
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), str(renders), params], env=env,
                             cwd=ROOT, capture_output=True, text=True, check=True)
    finally:
        if burner:
            burner.terminate()
            burner.join()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=30, help="timed pretraining steps per cell")
    ap.add_argument("--renders", type=int, default=2, help="timed renders of one batch (sampling.*) per cell")
    ap.add_argument("--policies", nargs="*", default=list(POLICIES),
                    help=f"of {list(POLICIES)}, or spin=N for any N")
    ap.add_argument("--threads", nargs="*", type=int, default=[2, 1])
    args = ap.parse_args()
    results: dict = {}
    print(f"{'policy':<13}{'threads':>8}{'train s/step quiet':>20}{'busy':>8}{'x':>6}"
          f"{'render s/batch quiet':>22}{'busy':>8}{'x':>6}", flush=True)
    for name in args.policies:
        for threads in args.threads:
            policy = POLICIES.get(name) or {"GOMP_SPINCOUNT": str(int(name.removeprefix("spin=")))}
            r = {mode: cell(policy, threads, args.steps, args.renders, args.params, mode == "busy")
                 for mode in ("quiet", "busy")}
            results.setdefault(name, {})[str(threads)] = r
            q, b = r["quiet"], r["busy"]
            print(f"{name:<13}{threads:>8}{q['train_step_s']:>20.3f}{b['train_step_s']:>8.3f}"
                  f"{b['train_step_s'] / q['train_step_s']:>6.2f}{q['render_batch_s']:>22.2f}"
                  f"{b['render_batch_s']:>8.2f}{b['render_batch_s'] / q['render_batch_s']:>6.2f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
