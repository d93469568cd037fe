"""Merged weights (engine/merge.py): the merged model answers exactly as base + adapter did,
and it is safetensors only."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.base_models import load_base_model
from engine.merge import MergeError, merge_adapter
from tests.helpers import SMOLLM2, random_adapter


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("Merged weights answer like base and adapter.", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_the_merged_model_answers_as_base_and_adapter_did(cache, tokenizer, base, tmp_path):
    unmerged = random_adapter(cache, tmp_path / "adapter")
    weights = merge_adapter(
        lambda: load_base_model(SMOLLM2, cache, "none", "cpu"),
        tmp_path / "adapter",
        tmp_path / "merged",
        tokenizer,
    )

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = logits(unmerged, tokenizer)
    assert torch.allclose(logits(merged, tokenizer), expected, atol=1e-4)
    assert not torch.allclose(logits(base, tokenizer), expected, atol=1e-2)  # the adapter counts
    assert weights == ["model.safetensors"]
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "tokenizer.json"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    assert merged.config.use_cache


def test_it_refuses_an_adapter_with_pickled_weights(cache, tokenizer, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MergeError, match="no adapter_model.safetensors"):
        merge_adapter(lambda: None, folder, tmp_path / "merged", tokenizer)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(MergeError, match="pickled files: adapter_model.bin"):
        merge_adapter(lambda: None, folder, tmp_path / "merged", tokenizer)
