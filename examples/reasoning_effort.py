"""Compare reasoning efforts: the same question at low, medium and high effort.

    python examples/reasoning_effort.py [MODEL]

The effort is one line of the system message ("Reasoning: low"); a trained model then thinks longer or shorter
in the analysis channel before its final answer. This prints, per effort, that line, the tokens sampled on
each channel, and the time taken. MODEL is a checkpoint folder; without it, a tiny random checkpoint is written
to a temporary folder (random weights ignore the effort: only the prompt changes).
"""

import time

import tinyoss
from tinyoss.generate import Reply, TokenEvent, generate, prepare_conversation
from tinyoss.harmony import render_conversation_for_completion
from tinyoss.sampling import Sampler
from tinyoss.synth import run_example
from tinyoss.tokenizer import get_tokenizer

QUESTION = "How many prime numbers are there below 30?"


def main(path) -> None:
    model = tinyoss.load(path)
    tokenizer = get_tokenizer()
    print(f"question: {QUESTION}")
    print(f"{'effort':8} {'prompt':>6} {'analysis':>8} {'final':>6} {'seconds':>8}  stop        answer")
    for effort in ("low", "medium", "high"):
        conversation = prepare_conversation(QUESTION, reasoning=effort, date="2025-08-05")
        prompt = render_conversation_for_completion(conversation)
        assert f"Reasoning: {effort}" in tokenizer.decode(prompt)  # the only line that changes
        per_channel = {"analysis": 0, "final": 0}
        start = time.perf_counter()
        for event in generate(model, conversation, sampler=Sampler(temperature=0), max_tokens=64):
            if isinstance(event, TokenEvent) and event.channel in per_channel:
                per_channel[event.channel] += 1
            elif isinstance(event, Reply):
                reply = event
        seconds = time.perf_counter() - start
        print(f"{effort:8} {len(prompt):>6} {per_channel['analysis']:>8} {per_channel['final']:>6} "
              f"{seconds:>8.2f}  {reply.stats.stop_reason:11} {reply.text[:40]!r}")


if __name__ == "__main__":
    run_example(main)  # main(the model named on the command line, else a tiny random one)
