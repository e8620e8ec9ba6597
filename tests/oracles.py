"""The numeric oracles: the official reference (`gpt_oss.torch`, float32 on CPU) and HF transformers.

Each returns logits [n_tokens, vocab] as float32 numpy; tests skip cleanly where an oracle is absent.
"""

from __future__ import annotations

import numpy as np
import pytest


def reference_logits(original_dir, tokens) -> np.ndarray:
    """The official reference implementation, run in float32 on the original/ layout."""
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("gpt_oss.torch.model")
    torch.set_num_threads(2)
    model = model_mod.Transformer.from_checkpoint(str(original_dir), device="cpu").to(torch.float32)
    with torch.inference_mode():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).float().numpy()


def transformers_logits(hf_dir, tokens) -> np.ndarray:
    """HF transformers' GptOss on the HF root layout, MXFP4 dequantized, float32, eager attention."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    model.eval()
    with torch.inference_mode():
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]
        return model(ids).logits[0].float().numpy()
