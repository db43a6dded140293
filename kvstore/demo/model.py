"""The demo's transformer: a Llama with random weights, and its KV cache in kvstore's page layout.

Nothing can be downloaded, so the model is ``LlamaForCausalLM`` built from a
``LlamaConfig`` with a fixed seed: every process that builds the same spec gets
the same weights (equality of outputs is what the demo proves, not their sense).

Hugging Face caches hold K and V per layer as ``[batch, kv_heads, seq, head_dim]``;
kvstore's canonical segment (one layer of one page) is head-major
``[K|V][kv_heads][page_size][head_dim]`` (kvstore/layout.py).  :func:`to_pages`
and :func:`from_pages` convert a whole layer (every page) with one strided copy
per K/V half, never a loop over pages.

Only stable public transformers APIs are used (LlamaConfig, LlamaForCausalLM,
DynamicCache, ``model.model.layers``, module hooks), so the same code runs with
the transformers of the ``demo`` extra and the one preinstalled on the GPU machine.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

log = logging.getLogger("kvstore.demo")

# Model shapes.  Weights are drawn with a wider spread than Hugging Face's default (0.02): the
# logits spread out, random-weight models stop repeating one token, and near-ties become rare.
# "small" runs on a 2-core CPU in well under a second per prompt; "8b" is the
# Llama-3-8B shape (32 layers, 32 query heads, 8 KV heads, head dim 128) for the GPU machine.
MODEL_SPECS: dict[str, dict[str, Any]] = {
    "small": {
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "vocab_size": 1024,
        "max_position_embeddings": 8192,
        "initializer_range": 0.05,
        "dtype": "float32",
    },
    # the small shape in bf16: the GPU run's comparison rules (near-ties, bit-identical KV) on a CPU
    "small-bf16": {
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "vocab_size": 1024,
        "max_position_embeddings": 8192,
        "initializer_range": 0.05,
        "dtype": "bfloat16",
    },
    "8b": {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 40960,
        "initializer_range": 0.05,
        "dtype": "bfloat16",
    },
}

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Which model (a :data:`MODEL_SPECS` name), its seed, and kvstore's page size for it."""

    name: str = "small"
    seed: int = 0
    page_size: int = 16
    shape: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in MODEL_SPECS:
            raise ValueError(f"unknown model {self.name!r}; choose one of {sorted(MODEL_SPECS)}")
        if not self.shape:
            object.__setattr__(self, "shape", dict(MODEL_SPECS[self.name]))

    @property
    def dtype_name(self) -> str:
        return str(self.shape["dtype"])

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype_name]

    @property
    def num_layers(self) -> int:
        return int(self.shape["num_hidden_layers"])

    @property
    def kv_heads(self) -> int:
        return int(self.shape["num_key_value_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.shape["head_dim"])

    @property
    def vocab_size(self) -> int:
        return int(self.shape["vocab_size"])

    @property
    def fingerprint(self) -> bytes:
        """Hash of the shape and the seed: what the weights are a function of."""
        text = json.dumps({"shape": self.shape, "seed": self.seed}, sort_keys=True)
        return xxhash.xxh3_128(text.encode()).digest()

    @property
    def namespace(self) -> str:
        return f"pd-demo/{self.name}/{self.fingerprint.hex()[:16]}"

    def namespace_args(self) -> dict[str, Any]:
        """Keyword arguments of ``KVStoreClient.create_namespace`` for this model's KV geometry."""
        return {
            "page_size": self.page_size,
            "num_layers": self.num_layers,
            "fingerprint": self.fingerprint,
            "kind": "mha",
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype_name,
        }

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def llama_config(self) -> LlamaConfig:
        kwargs = {k: v for k, v in self.shape.items() if k != "dtype"}
        # No end-of-sequence token: generate() then always runs max_new_tokens steps, as the
        # disaggregated decode does, so the two are compared step for step.
        return LlamaConfig(**kwargs, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_model(spec: ModelSpec, device: str = "cpu") -> LlamaForCausalLM:
    """The spec's model with its seeded random weights, in eval mode, on ``device``.

    The weights are drawn on the device itself in the model's dtype (an 8B model
    never passes through host memory or float32).
    """
    previous = torch.get_default_dtype()
    torch.manual_seed(spec.seed)
    torch.set_default_dtype(spec.dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(spec.llama_config())
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def cache_argument(model: LlamaForCausalLM) -> str:
    """The forward keyword that takes the cache: ``past_key_values``, renamed ``cache`` in transformers 5.24."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model: LlamaForCausalLM) -> DynamicCache:
    return DynamicCache(config=model.config)


def cache_layer(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of one layer, ``[batch, kv_heads, seq, head_dim]`` each."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # type: ignore[attr-defined]


def drop_last_tokens(cache: DynamicCache, count: int) -> None:
    """Remove the last ``count`` tokens from every layer of ``cache``.

    ``crop`` with a negative argument: the one form every transformers 5.x takes
    (a positive length is refused from 5.24 on).
    """
    if count > 0:
        cache.crop(-count)


def to_pages(key: torch.Tensor, value: torch.Tensor, num_pages: int, page_size: int) -> torch.Tensor:
    """The first ``num_pages`` full pages of one layer as canonical segments, ``[num_pages, segment_bytes]`` uint8.

    ``key``/``value`` are ``[1, kv_heads, seq, head_dim]``; the result is on their device.
    """
    _, heads, _, head_dim = key.shape
    tokens = num_pages * page_size
    pages = torch.empty((num_pages, 2, heads, page_size, head_dim), dtype=key.dtype, device=key.device)
    # [heads, tokens, dim] -> [heads, pages, page, dim] -> [pages, heads, page, dim]: one strided copy per half
    pages[:, 0] = key[0, :, :tokens].reshape(heads, num_pages, page_size, head_dim).permute(1, 0, 2, 3)
    pages[:, 1] = value[0, :, :tokens].reshape(heads, num_pages, page_size, head_dim).permute(1, 0, 2, 3)
    return pages.view(num_pages, -1).view(torch.uint8)


def from_pages(
    pages: Any, spec: ModelSpec, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) ``[1, kv_heads, num_pages*page_size, head_dim]`` from canonical segments of one layer.

    ``pages`` is ``[num_pages, segment_bytes]`` bytes: a numpy array (a view of a
    get_prefix buffer) or a uint8 tensor; K and V come out as fresh contiguous
    tensors on ``device`` (the buffer can be reused at once).
    """
    raw = torch.from_numpy(pages) if isinstance(pages, np.ndarray) else pages
    raw = raw.to(device, non_blocking=True)
    num_pages = raw.shape[0]
    heads, page_size, head_dim = spec.kv_heads, spec.page_size, spec.head_dim
    typed = raw.reshape(-1).view(spec.dtype).view(num_pages, 2, heads, page_size, head_dim)
    tokens = num_pages * page_size
    key = typed[:, 0].permute(1, 0, 2, 3).reshape(1, heads, tokens, head_dim)
    value = typed[:, 1].permute(1, 0, 2, 3).reshape(1, heads, tokens, head_dim)
    return key, value


def demo_prompt(seed: int, length: int, vocab_size: int) -> np.ndarray:
    """A deterministic prompt of ``length`` token ids in [0, vocab_size)."""
    return np.random.default_rng(seed).integers(0, vocab_size, length, dtype=np.int64)


def top2_margin(logits: torch.Tensor) -> float:
    """Gap between the two largest logits of one step (small gap: a near-tie that rounding may flip)."""
    top = torch.topk(logits.float().reshape(-1), 2).values
    return float(top[0] - top[1])
