"""Generate text with the Python API: load a model, stream a reply token by token.

    python examples/generate_text.py [MODEL]

MODEL is a checkpoint folder (an HF repo root such as gpt-oss-20b/, or its original/ folder). Without it, a
tiny random checkpoint is written to a temporary folder: everything runs, but random weights write noise.
"""


import tinyoss
from tinyoss.generate import Reply, TokenEvent, generate
from tinyoss.synth import run_example
from tinyoss.tokenizer import get_tokenizer


def main(path) -> None:
    model = tinyoss.load(path)
    question = "Explain a mixture of experts in one sentence."

    # stream: the reasoning (analysis channel) and the answer (final channel) as they are sampled
    sampler = tinyoss.Sampler(temperature=0.7, top_p=0.95, seed=0)
    for event in generate(model, question, sampler=sampler, max_tokens=128, reasoning="low"):
        if isinstance(event, TokenEvent) and event.channel in ("analysis", "final"):
            print(event.text, end="", flush=True)
        elif isinstance(event, Reply):
            reply = event
    print()
    s = reply.stats
    print(f"[{s.generated_tokens} tokens, prefill {s.prefill_tok_s:.0f} tok/s, "
          f"decode {s.decode_tok_s:.1f} tok/s, stop: {s.stop_reason}]")
    print("final answer:", repr(reply.text))
    # what was sampled, special tokens included (on random weights: noise, rarely valid harmony)
    print("raw:", repr(get_tokenizer().decode(reply.tokens))[:200])

    # or in one call, greedy (temperature 0: the same reply every time)
    again = tinyoss.chat(model, question, sampler=tinyoss.Sampler(temperature=0), max_tokens=16, reasoning="low",
                 date="2025-08-05")
    print("greedy tokens:", again.tokens)


if __name__ == "__main__":
    run_example(main)  # main(the model named on the command line, else a tiny random one)
