"""Attention within each packed example, without a mask over the whole row.

A packed row holds several examples, each starting at position 0. transformers' sdpa path keeps
them apart with a block-causal mask over the row: its cost grows with the square of the row,
not of the examples in it, and the masked kernel cannot skip the blocks the mask rules out. Here
each example's queries attend to its own keys, causally, one ``scaled_dot_product_attention``
call per example, and no mask is built at all (as flash-attention's variable-length kernel does
on a GPU, which base_models uses instead where flash-attn is installed).

Measured on a 2-core Xeon with AMX (SmolLM2-135M, LoRA r16 all-linear, bf16, steps of 8
examples of 68-301 tokens): 174 label tokens/s in forwards of 512 tokens against ~150 through
the masked sdpa path, and 192 in forwards of 1024, which the mask's square made slower than 512
before (engine/plan.py FORWARD_TOKENS).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PER_DOCUMENT = "loft_per_document"


def per_document_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_lengths: list[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, heads, tokens, dim], key and value
    [1, kv_heads, tokens, dim]; returns [1, tokens, heads, dim]. Without document_lengths (a
    padded batch, generation with its KV cache) it is sdpa, mask and all."""
    if document_lengths is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # q and k arrive in fp32 (the rotary embedding's cos and sin are fp32), v in bf16;
        # attention itself runs in the autocast dtype, as CUDA's autocast runs sdpa.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    grouped = query.shape[1] != key.shape[1]
    # On a CPU the matmul path beats the fused kernel, whose backward pass is ~3x slower
    # (measured: 282 ms against 118 ms of a step's 1.3 s); on CUDA the fused kernels win.
    kernel = sdpa_kernel(SDPBackend.MATH) if device == "cpu" else contextlib.nullcontext()
    with kernel:
        outputs = [
            F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=grouped
            )
            for q, k, v in zip(
                query.split(document_lengths, dim=2),
                key.split(document_lengths, dim=2),
                value.split(document_lengths, dim=2),
                strict=True,
            )
        ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


# The mask is sdpa's: built once per forward (~4 ms for a row of 1820 tokens), ignored where
# document_lengths are given. One implementation for every call keeps a forward and its
# recomputation under gradient checkpointing on the same path.
AttentionInterface.register(PER_DOCUMENT, per_document_attention)
AttentionMaskInterface.register(PER_DOCUMENT, sdpa_mask)


def use_per_document_attention(causal_lm) -> None:
    """Switch a model that computes attention through sdpa to this module's function (flash
    attention keeps packed examples apart on its own)."""
    if causal_lm.config._attn_implementation == "sdpa":
        causal_lm.config._attn_implementation = PER_DOCUMENT


def document_lengths(position_ids: torch.Tensor) -> list[int]:
    """The lengths of a packed row's examples: each starts where its position is 0."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    ends = starts[1:] + [position_ids.shape[1]]
    return [end - start for start, end in zip(starts, ends, strict=True)]


def applies_to(causal_lm) -> bool:
    return causal_lm.config._attn_implementation == PER_DOCUMENT
