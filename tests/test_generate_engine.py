"""engine/generate.py on its own: one base model with several LoRA adapters switched in and out
of an LRU cache, and the incremental decoding that sends answers in whole characters (answers
themselves: tests/test_batching_engine.py)."""

import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError

from engine.base_models import load_base_model
from engine.generate import (
    AdapterCache,
    _IncrementalDecoder,
)
from tests.helpers import SMOLLM2

KEYS = ["ftad-0", "ftad-1", "ftad-2"]


def fresh_base(cache):
    return load_base_model(SMOLLM2, cache, "none", "cpu")


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("The capital of France is")])


@pytest.fixture(scope="module")
def adapters(cache, tmp_path_factory) -> dict:
    """Three random adapters (B not zero, so each changes the logits), built on a base of
    their own: get_peft_model wraps the model it is given."""
    folder = tmp_path_factory.mktemp("adapters")
    model = fresh_base(cache)
    for seed, key in enumerate(KEYS):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(folder / key)
        model = peft_model.unload()
    return {key: folder / key for key in KEYS}


@pytest.fixture(scope="module")
def expected(cache, adapters, ids) -> dict:
    """Each adapter's logits through PeftModel.from_pretrained on a freshly loaded base, and the
    plain base's (key None)."""
    logits = {None: logits_of(fresh_base(cache), ids)}
    for key, folder in adapters.items():
        logits[key] = logits_of(PeftModel.from_pretrained(fresh_base(cache), folder), ids)
    return logits


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# --- the adapter cache --------------------------------------------------------------------


def test_the_adapters_change_the_logits_so_that_they_can_be_told_apart(expected):
    outputs = list(expected.values())
    for i, a in enumerate(outputs):
        for b in outputs[i + 1 :]:
            assert (a - b).abs().max() > 1.0


def test_the_base_is_loaded_once_for_several_adapters_and_the_lru_is_evicted(
    cache, adapters, expected, ids
):
    def load_base():
        return fresh_base(cache)

    opened: list[str] = []

    def folder_of(key):
        def folder():
            opened.append(key)
            return adapters[key]

        return folder

    adapter_cache = AdapterCache(load_base, capacity=2)
    assert adapter_cache.base_loads == 0  # lazily, at the first use
    # (key, adapters loaded afterwards, least recently used first)
    steps = [
        (None, []),
        ("ftad-0", ["ftad-0"]),
        ("ftad-1", ["ftad-0", "ftad-1"]),
        ("ftad-0", ["ftad-1", "ftad-0"]),
        (None, ["ftad-1", "ftad-0"]),
        ("ftad-2", ["ftad-0", "ftad-2"]),  # ftad-1 evicted
        ("ftad-0", ["ftad-2", "ftad-0"]),
        ("ftad-1", ["ftad-0", "ftad-1"]),  # ftad-2 evicted, ftad-1 loaded again
        (None, ["ftad-0", "ftad-1"]),
    ]
    for key, loaded in steps:
        with adapter_cache.use(key, folder_of(key)) as model:
            assert close(logits_of(model, ids), expected[key]), key
        assert adapter_cache.loaded == loaded, key

    assert adapter_cache.base_loads == 1
    assert opened == ["ftad-0", "ftad-1", "ftad-2", "ftad-1"]  # only on a miss
    assert adapter_cache.stats == {"hits": 2, "misses": 4, "evictions": 2}
    peft_names = list(model.peft_config)
    assert len(peft_names) == 2  # evicted adapters are deleted from the model


def test_a_failed_load_leaves_the_base_and_the_cache_as_they_were(
    cache, adapters, expected, ids, tmp_path
):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(
        (adapters["ftad-0"] / "adapter_config.json").read_text()
    )
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    adapter_cache = AdapterCache(lambda: fresh_base(cache), capacity=2)

    with pytest.raises(SafetensorError), adapter_cache.use("ftad-broken", lambda: broken):
        pass  # the first adapter: peft had already wrapped the base's layers
    with adapter_cache.use(None, lambda: broken) as model:
        assert close(logits_of(model, ids), expected[None])
    with adapter_cache.use("ftad-0", lambda: adapters["ftad-0"]) as model:
        assert close(logits_of(model, ids), expected["ftad-0"])
    with pytest.raises(SafetensorError), adapter_cache.use("ftad-broken", lambda: broken):
        pass  # a later adapter
    with adapter_cache.use("ftad-1", lambda: adapters["ftad-1"]) as model:
        assert close(logits_of(model, ids), expected["ftad-1"])
        assert len(model.peft_config) == 2

    assert adapter_cache.loaded == ["ftad-0", "ftad-1"]
    assert adapter_cache.base_loads == 1


@pytest.mark.slow  # ~30 s on 2 cores: a second base, quantized to 4 bits, for one test
def test_adapters_served_on_a_4bit_base_leave_the_base_as_it_was(cache, adapters, ids):
    """A QLoRA adapter is served on its 4-bit base. peft's state-dict loaders would rewrite a
    4-bit model's quantization state on the CPU (engine/train.py); the cache copies weights by
    parameter instead, so the base answers the same before and after adapters are loaded."""
    adapter_cache = AdapterCache(lambda: load_base_model(SMOLLM2, cache, "nf4", "cpu"))
    with adapter_cache.use(None, lambda: None) as model:
        before = logits_of(model, ids)
    with adapter_cache.use("ftad-0", lambda: adapters["ftad-0"]) as model:
        tuned = logits_of(model, ids)
    with adapter_cache.use("ftad-1", lambda: adapters["ftad-1"]) as model:
        assert (logits_of(model, ids) - tuned).abs().max() > 1.0
    with adapter_cache.use(None, lambda: None) as model:
        assert close(logits_of(model, ids), before)
    assert (tuned - before).abs().max() > 1.0


def test_a_nested_use_in_the_same_thread_is_refused(cache, adapters):
    adapter_cache = AdapterCache(lambda: fresh_base(cache))
    with (
        adapter_cache.use(None, lambda: adapters["ftad-0"]),
        pytest.raises(RuntimeError, match="re-entrant"),
        adapter_cache.use("ftad-0", lambda: adapters["ftad-0"]),
    ):
        pass
    with adapter_cache.use("ftad-0", lambda: adapters["ftad-0"]):
        pass  # the lock was released


def test_threads_switching_adapters_each_get_their_own(cache, adapters, expected, ids):
    adapter_cache = AdapterCache(lambda: fresh_base(cache), capacity=3)
    wrong: list[str] = []

    def ask(keys):
        for key in keys:
            with adapter_cache.use(key, lambda key=key: adapters[key]) as model:
                if not close(logits_of(model, ids), expected[key]):
                    wrong.append(key)

    threads = [
        threading.Thread(target=ask, args=(["ftad-0", None, "ftad-1"],)),
        threading.Thread(target=ask, args=(["ftad-1", "ftad-0", None],)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert adapter_cache.base_loads == 1


def test_the_capacity_must_hold_at_least_one_adapter():
    with pytest.raises(ValueError, match="capacity"):
        AdapterCache(lambda: None, capacity=0)


# --- generation ---------------------------------------------------------------------------


def test_a_character_split_across_tokens_is_never_split_across_pieces(tokenizer):
    text = "日本語 😀 café"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.decode([t]).endswith("\ufffd") for t in tokens)  # the case exists
    growing: list[int] = []
    decoder = _IncrementalDecoder(tokenizer, growing)
    pieces = []
    for token in tokens:
        growing.append(token)
        pieces.append(decoder.step())
    pieces.append(decoder.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text
