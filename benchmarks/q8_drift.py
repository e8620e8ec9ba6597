"""How far dense="q8" (int8 blocks of 32), kv="bf16" or expert_input="q8" moves the logits from
the exact path.

    python benchmarks/q8_drift.py MODEL [--tokens 64] [--seed 0] [--dense q8|bf16] [--kv f32|bf16]
        [--expert-input f32|q8]

Prints, over the positions of one random prompt: the largest |Δlogit|, the same relative to the
logits' standard deviation, how often the greedy token agrees, and the mean KL(exact || other).
(The exactness of each path is proven by the tests: bf16 against the official reference, q8
against the reference given the same int8 weights, a bf16 KV cache against the reference with
bf16-rounded keys and values, int8 expert inputs against the reference with its experts' inputs
rounded alike.)
"""

from __future__ import annotations

import argparse

import numpy as np

import tinyoss


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense", default="q8", choices=["bf16", "q8"])
    ap.add_argument("--kv", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--expert-input", default="f32", choices=["f32", "q8"])
    args = ap.parse_args()
    exact = tinyoss.load(args.model)
    tokens = np.random.default_rng(args.seed).integers(0, min(exact.config.vocab_size, 199998),
                                                       args.tokens)
    a = exact.forward(tokens)
    del exact
    b = tinyoss.load(args.model, dense=args.dense, kv=args.kv,
                     expert_input=args.expert_input).forward(tokens)
    la, lb = log_softmax(a.astype(np.float64)), log_softmax(b.astype(np.float64))
    kl = (np.exp(la) * (la - lb)).sum(axis=-1).mean()
    diff = np.abs(a - b).max()
    print(f"tokens {args.tokens}: max |dlogit| {diff:.4f} ({diff / a.std():.4f} of the logit std), "
          f"greedy agreement {(a.argmax(-1) == b.argmax(-1)).mean():.3f}, "
          f"mean KL(exact||dense {args.dense}, kv {args.kv}, expert input {args.expert_input}) "
          f"{kl:.5f} nats")


if __name__ == "__main__":
    main()
