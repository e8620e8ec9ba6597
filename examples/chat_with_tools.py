"""Chat with function tools: plain Python functions the model may call, a conversation over two turns.

    python examples/chat_with_tools.py [MODEL]

Each function's name, docstring and type hints become the tool description the model reads; when the model
calls one, generate() runs it and feeds the result back. MODEL is a checkpoint folder; without it, a tiny
random checkpoint is written to a temporary folder (random weights never call a tool on purpose).
"""

from typing import Literal

import tinyoss
from tinyoss.generate import Context, Reply, TokenEvent, ToolEvent, generate
from tinyoss.harmony import Message, tool_from_function, tools_section
from tinyoss.sampling import Sampler
from tinyoss.synth import run_example


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        city: The city, e.g. Paris.
        unit: The temperature unit.
    """
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "sky": "clear"}


def add(a: float, b: float) -> float:
    """Add two numbers exactly."""
    return a + b


TOOLS = [get_weather, add]


def main(path) -> None:
    model = tinyoss.load(path)
    print(tools_section([tool_from_function(f) for f in TOOLS]))  # what the model is told
    print()

    context = Context(model)  # one KV cache for the whole conversation
    sampler = Sampler(temperature=0.7, seed=0)
    history: list[Message] = []
    for question in ("What is the weather in Paris?", "And what is 12.5 + 29.5?"):
        print(f"> {question}")
        events = generate(model, history + [Message.user(question)], tools=TOOLS, sampler=sampler,
                          max_tokens=96, reasoning="low", date="2025-08-05", context=context)
        for event in events:
            if isinstance(event, ToolEvent):
                print(f"[called {event.recipient}({event.arguments}) -> {event.result}]")
            elif isinstance(event, TokenEvent) and event.channel == "final":
                print(event.text, end="", flush=True)
            elif isinstance(event, Reply):
                reply = event
        print()
        s = reply.stats
        print(f"[{s.prompt_tokens} prompt tokens ({s.reused_tokens} from the cache), "
              f"{s.generated_tokens} sampled, stop: {s.stop_reason}]")
        # keep the exchange; generate() leaves out the reasoning of finished turns by itself
        history += [Message.user(question), *reply.messages]


if __name__ == "__main__":
    run_example(main)  # main(the model named on the command line, else a tiny random one)
