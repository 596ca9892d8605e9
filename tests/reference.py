"""The reference implementation: transformers' GptOssForCausalLM, float32, eager attention, on the CPU."""

from pathlib import Path

import numpy as np


def load_reference(directory: Path, dtype=None):
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        directory,
        dtype=dtype or torch.float32,
        attn_implementation="eager",  # sdpa drops the sinks
        quantization_config=Mxfp4Config(dequantize=True),
    )
    return model.eval()


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Logits [T, V] of one unpadded prompt."""
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0]
        return logits.float().numpy()
