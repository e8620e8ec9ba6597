"""Inspect routing: which experts each token is sent to, and how evenly the experts are used.

    python examples/inspect_routing.py [MODEL]

Records one forward pass with tinyoss.recorder, then prints, for the middle layer, each token's experts with
their mixing weights, and for every layer the load of its busiest expert and how many experts went unused.
MODEL is a checkpoint folder; without it, a tiny random checkpoint is written to a temporary folder.
"""


import numpy as np

import tinyoss
from tinyoss.harmony import Message, render_conversation_for_completion
from tinyoss.recorder import record
from tinyoss.synth import run_example
from tinyoss.tokenizer import get_tokenizer

PROMPT = "def add(a, b):\n    return a + b  # 12 + 30 = 42"


def main(path) -> None:
    model = tinyoss.load(path)
    tokenizer = get_tokenizer()
    ids = render_conversation_for_completion([Message.user(PROMPT)])
    rec = record(model, ids)

    layer = rec.n_layers // 2
    print(f"layer {layer}: each token's experts, best first (expert:weight)")
    for t, token in enumerate(ids):
        choices = "  ".join(f"e{e}:{w:.2f}" for e, w in zip(rec.experts[layer, t], rec.expert_weights[layer, t]))
        print(f"  {tokenizer.decode([token])!r:>16}  {choices}")

    counts = rec.expert_counts  # [layers, experts]: tokens each expert processed
    fair = rec.n_tokens * rec.experts.shape[-1] / counts.shape[1]
    print(f"\nload per layer ({rec.n_tokens} tokens; an even split gives each expert {fair:.1f})")
    for L, row in enumerate(counts):
        busiest = int(np.argmax(row))
        print(f"  layer {L:>2}: busiest e{busiest} with {row[busiest]} tokens ({row[busiest] / fair:.1f}x even), "
              f"{np.sum(row == 0)} of {len(row)} experts unused")


if __name__ == "__main__":
    run_example(main)  # main(the model named on the command line, else a tiny random one)
