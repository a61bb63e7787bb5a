"""How well each profile embedding tells the user branch what a user bans: a linear read-back.

For each setting (``embedder:profile_parts``), the default users (the `users` stage's generator and params) are
embedded; one logistic probe per category is fitted on the seen users' vectors (standardised by the seen users'
mean and std, as the branch does) and asked, for each unseen user, whether they ban that category. Prints the
probes' accuracy per category side by side with the majority-class baseline (always answer what most seen users
answer), then one JSON object. Nothing is trained on the unseen users; no pipeline outputs are needed.

    python benchmarks/psa_embedding_probe.py                                  # minilm and llm (SmolLM2), whole and fields
    python benchmarks/psa_embedding_probe.py --setting llm:fields --set psa.embedder_path=/models/qwen2.5-7b
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from safealign.core.params import load_params, parse_overrides
from safealign.core.runtime import setup_runtime

DEFAULT_SETTINGS = ("minilm:whole", "minilm:fields", "llm:whole", "llm:fields")


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy on the test rows of a logistic probe fitted on the training rows (a constant label: that label)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(y_train.tolist())) < 2:
        return float(np.mean(y_test == y_train[0]))
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    return float(np.mean(clf.predict(x_test) == y_test))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--setting", action="append", dest="settings", metavar="EMBEDDER:PARTS")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from safealign.psa.method import embed_texts
    from safealign.psa.users import generate_users

    results: dict[str, Any] = {}
    for setting in args.settings or DEFAULT_SETTINGS:
        embedder, _, parts = setting.partition(":")
        params = load_params(args.params, {"runtime.threads": args.threads, "psa.embedder": embedder,
                                           "psa.profile_parts": parts or "fields",
                                           **parse_overrides(args.set, "--set")})
        device = setup_runtime(params)
        cats, u = tuple(params.categories), params.users
        users = generate_users(cats, u.seen, u.unseen, params.seed, u.consider, u.variety)
        t0 = time.perf_counter()
        vectors = embed_texts(params, list(users.profile), device).numpy().astype(np.float64)
        seconds = time.perf_counter() - t0
        seen = (users.split == "seen").to_numpy()
        mean, std = vectors[seen].mean(0), vectors[seen].std(0) + 1e-6
        z = (vectors - mean) / std
        acc, majority = {}, {}
        for c in cats:
            y = np.array([c in list(b) for b in users.banned], dtype=int)
            acc[c] = probe(z[seen], y[seen], z[~seen], y[~seen])
            majority[c] = float(np.mean(y[~seen] == int(y[seen].mean() >= 0.5)))
        results[setting] = {"dim": int(vectors.shape[1]), "seconds": round(seconds, 1), "accuracy": acc,
                            "majority": majority, "mean": float(np.mean(list(acc.values()))),
                            "min": float(min(acc.values()))}
    first = next(iter(results.values()))
    cats = list(first["accuracy"])
    print("\n| setting | dim | " + " | ".join(cats) + " | mean | min | embed s |")
    print("|---" * (len(cats) + 5) + "|")
    print("| majority class | | " + " | ".join(f"{first['majority'][c]:.2f}" for c in cats)
          + f" | {np.mean(list(first['majority'].values())):.2f} | | |")
    for name, r in results.items():
        print(f"| {name} | {r['dim']} | " + " | ".join(f"{r['accuracy'][c]:.2f}" for c in cats)
              + f" | {r['mean']:.3f} | {r['min']:.2f} | {r['seconds']:.0f} |")
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
