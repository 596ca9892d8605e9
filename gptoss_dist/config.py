"""The GPT-OSS architecture as one frozen dataclass, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """The published models' pattern: the even layers slide, the odd ones attend to the whole context."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


class ConfigError(ValueError):
    """A model config that is inconsistent or names something this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architectural number of a GPT-OSS model; defaults are GPT-OSS-20B's."""

    vocab_size: int = 201088
    hidden_size: int = 2880
    num_layers: int = 24
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2880
    num_experts: int = 32
    experts_per_token: int = 4
    sliding_window: int = 128
    layer_types: tuple[str, ...] = default_layer_types(24)  # one entry per layer, SLIDING or FULL
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_original_max_position: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ConfigError(f"layer_types holds {unknown}; expected only {SLIDING!r} and {FULL!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(f"experts_per_token={self.experts_per_token} must be in 1..{self.num_experts}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for the half-split rotary embedding")

    @property
    def rope_attention_scale(self) -> float:
        """YaRN's factor on cos and sin: 0.1 * ln(factor) + 1."""
        return 0.1 * math.log(self.rope_factor) + 1.0 if self.rope_factor > 1 else 1.0

    def check_max_len(self, max_len: int) -> None:
        """Raises ConfigError, naming both numbers, for a context longer than the model's positions."""
        if max_len > self.max_position_embeddings:
            raise ConfigError(
                f"max_len {max_len} exceeds the model's {self.max_position_embeddings} positions "
                "(max_position_embeddings)"
            )

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None where the layer attends to every earlier key."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Reads a published `config.json` (`rope_scaling`) or transformers 5's form (`rope_parameters`)."""
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type != "yarn":
            raise ConfigError(f"rope type {rope_type!r} is not supported; GPT-OSS uses 'yarn'")
        num_layers = int(hf["num_hidden_layers"])
        layer_types = hf.get("layer_types") or default_layer_types(num_layers)
        experts_per_token = hf.get("num_experts_per_tok", hf.get("experts_per_token"))
        num_experts = hf.get("num_local_experts", hf.get("num_experts"))
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                num_layers=num_layers,
                num_heads=int(hf["num_attention_heads"]),
                num_kv_heads=int(hf["num_key_value_heads"]),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_experts=int(num_experts),
                experts_per_token=int(experts_per_token),
                sliding_window=int(hf.get("sliding_window") or 128),
                layer_types=tuple(layer_types),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 150000.0))),
                rope_factor=float(rope.get("factor", 32.0)),
                rope_original_max_position=int(
                    rope.get("original_max_position_embeddings", hf.get("initial_context_length", 4096))
                ),
                rope_beta_fast=float(rope.get("beta_fast", 32.0)),
                rope_beta_slow=float(rope.get("beta_slow", 1.0)),
                rope_truncate=bool(rope.get("truncate", True)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            )
        except (KeyError, TypeError) as err:
            raise ConfigError(f"config is missing or has an unreadable field: {err}") from err

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from err
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def to_hf_dict(self) -> dict[str, Any]:
        """The published `config.json` form (as in openai/gpt-oss-20b)."""
        # The published token ids (<|return|>, <|endoftext|>) exist only in the o200k_harmony vocabulary.
        special = {"eos_token_id": 200002, "pad_token_id": 199999} if self.vocab_size > 200002 else {}
        return special | {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.rope_original_max_position,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "truncate": self.rope_truncate,
            },
            "initial_context_length": self.rope_original_max_position,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
        }
