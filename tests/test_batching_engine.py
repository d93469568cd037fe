"""The serving engine on its own (engine/batching.py): requests for several LoRA adapters of one
base, and for the base itself, answered together in one running batch, each exactly as it would
be answered alone."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine import artifacts, data
from engine.base_models import load_base_model
from engine.batching import BatchedEngine, Request, Sampling
from engine.evaluate import _prompt_ids
from tests.helpers import SMOLLM2

ADAPTERS = ["ad-0", "ad-1", "ad-2", "ad-3"]
MODELS = [None, *ADAPTERS]  # None: the plain base
QUESTIONS = [
    "What is the capital of France?",
    "Write a long story about a dragon who guards a library in the mountains.",
]
NEW_TOKENS = 16


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    completion_tokens: int
    error: str | None = None


# The model answers some 60 requests here (about a minute): make test, not test-fast.
pytestmark = pytest.mark.slow

# Figures, not checks: run on a quiet machine with LOFT_MEASURE=1 pytest -s -k measure
# (bench/results/batching-engine-*.txt); the suite leaves them out (speed lives in bench/).
MEASUREMENT = pytest.mark.skipif(
    not os.environ.get("LOFT_MEASURE"), reason="a measurement: LOFT_MEASURE=1 to run it"
)


class Recorder:
    """A listener that keeps what it is told, and cancels ids after the steps it is told to."""

    def __init__(self, cancel_after: dict[int, set[str]] | None = None):
        self.pieces: dict[str, list[str]] = defaultdict(list)
        self.finishes: dict[str, tuple] = {}
        self.steps: list[list[str]] = []  # the ids running after each step
        self.cancel_after = cancel_after or {}
        self.engine: BatchedEngine | None = None

    def piece(self, request_id: str, text: str) -> None:
        assert request_id not in self.finishes, f"a piece of {request_id} after it finished"
        self.pieces[request_id].append(text)

    def finished(self, request_id, finish_reason, prompt_tokens, completion_tokens, error=None):
        assert request_id not in self.finishes, f"{request_id} finished twice"
        self.finishes[request_id] = (finish_reason, prompt_tokens, completion_tokens, error)

    def after_step(self, running: list[str]) -> set[str]:
        # Called after a step, and also after its new rows' prompts: the step's last call wins.
        step = self.engine.stats["steps"]
        if len(self.steps) == step:
            self.steps[-1] = list(running)
        else:
            self.steps.append(list(running))
        return self.cancel_after.pop(step, set())

    def answer(self, request_id: str) -> Answer:
        reason, _, completion_tokens, error = self.finishes[request_id]
        return Answer("".join(self.pieces[request_id]), reason, completion_tokens, error)


def engine_for(cache, tokenizer, listener, **options) -> BatchedEngine:
    engine = BatchedEngine(
        lambda: load_base_model(SMOLLM2, cache, "none", "cpu"), tokenizer, listener, **options
    )
    listener.engine = engine
    return engine


def serve(engine: BatchedEngine, requests: list[Request], joining: dict[str, int] | None = None):
    """Step until every request is answered; ``joining`` submits a request before the step of
    that number (from 0) instead of at the start."""
    joining = joining or {}
    steps = 0
    while True:
        for request in requests:
            if joining.get(request.id, 0) == steps:
                engine.submit(request)
        busy = engine.step()
        steps += 1
        if not busy and steps > max(joining.values(), default=0):
            return


def request(name: str, prompt: list[int], model: str | None, adapters: dict, **sampling) -> Request:
    sampling.setdefault("max_new_tokens", NEW_TOKENS)
    folder = adapters[model] if model is not None else None
    return Request(name, prompt, model, Sampling(**sampling), folder)


@pytest.fixture(scope="module")
def adapters(cache, tmp_path_factory) -> dict:
    """Four random LoRA adapters (B not zero, weights large enough that each answers otherwise)
    and one DoRA adapter, built on a base of their own: get_peft_model wraps the model given."""
    folder = tmp_path_factory.mktemp("adapters")
    model = load_base_model(SMOLLM2, cache, "none", "cpu")
    for seed, key in enumerate([*ADAPTERS, "dora"]):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            # Every linear layer for a LoRA; DoRA's, slow to compute, on two.
            target_modules=["q_proj", "v_proj"] if key == "dora" else "all-linear",
            init_lora_weights=False,
            use_dora=key == "dora",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(folder / key)
        model = peft_model.unload()
    return {key: folder / key for key in [*ADAPTERS, "dora"]}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [_prompt_ids([data.Message("user", q)], tokenizer) for q in QUESTIONS]


def key(model: str | None, prompt: int) -> str:
    return f"{model or 'base'}/{prompt}"


@pytest.fixture(scope="module")
def alone(cache, tokenizer, adapters, prompts) -> dict[str, Answer]:
    """Every model's greedy answer to every prompt, one request at a time (max_rows=1)."""
    recorder = Recorder()
    engine = engine_for(cache, tokenizer, recorder, max_rows=1)
    requests = [
        request(key(model, p), prompts[p], model, adapters)
        for p in range(len(prompts))
        for model in MODELS
    ]
    serve(engine, requests)
    assert all(len(running) <= 1 for running in recorder.steps)
    return {r.id: recorder.answer(r.id) for r in requests}


# --- the Done-when ------------------------------------------------------------------


def test_the_base_and_each_adapter_answer_otherwise_so_a_misrouted_row_would_show(alone):
    for p in range(len(QUESTIONS)):
        texts = [alone[key(model, p)].text for model in MODELS]
        assert len(set(texts)) == len(MODELS), texts


def test_a_mixed_batch_answers_each_request_as_it_is_answered_alone(
    cache, tokenizer, adapters, prompts, alone
):
    recorder = Recorder()
    engine = engine_for(cache, tokenizer, recorder)
    requests = [
        request(key(model, p), prompts[p], model, adapters)
        for p in range(len(prompts))
        for model in MODELS
    ]
    # The long prompt's rows join while the short prompt's run.
    serve(engine, requests, joining={key(model, 1): 3 for model in MODELS})

    for r in requests:
        assert recorder.answer(r.id) == alone[r.id], r.id
    assert engine.stats["largest_batch"] == len(requests)
    assert engine.stats["forwards"] < sum(a.completion_tokens + 1 for a in alone.values()) / 3


def test_the_stacked_lora_routing_computes_what_peft_computes_for_a_mixed_batch(
    cache, adapters, prompts
):
    """engine/batching.py's own per-row LoRA (``_MixedLoRA``) against peft's mixed batches
    (``adapter_names``), on one prefill forward: adapters of different ranks and layers (a rank 4
    on q/v beside the rank 8 on every linear layer), rows of the plain base among them."""
    from peft import PeftModel

    from engine.batching import BASE, _MixedLoRA

    base = load_base_model(SMOLLM2, cache, "none", "cpu")
    torch.manual_seed(7)
    small = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    small.save_pretrained(adapters["dora"].parent / "small")
    base = small.unload()
    model = PeftModel.from_pretrained(base, str(adapters["ad-0"]), adapter_name="ad-0")
    for name in ["ad-1", "ad-2"]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.load_adapter(str(adapters["dora"].parent / "small"), adapter_name="small")
    model.eval()
    names = ["ad-1", BASE, "small", "ad-0", "ad-1", BASE, "small", "ad-2"]
    ids = torch.tensor([prompts[0][:12]] * len(names))

    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
        with _MixedLoRA(model).routed(names):
            routed = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits  # the hooks are gone: the active adapter again

    scale = expected.abs().max()
    assert (routed - expected).abs().max() / scale < 1e-5
    # Rows of one prompt differ by their adapter alone: each got its own.
    assert (routed[0] - routed[1]).abs().max() / scale > 1e-2
    assert (routed[2] - routed[1]).abs().max() / scale > 1e-2
    assert torch.equal(plain[0], plain[1])


# --- leaving early ----------------------------------------------------------------------------


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_go_on_unchanged(
    cache, tokenizer, adapters, prompts, alone
):
    # ad-1 cancelled by the listener after step 3, ad-2 by cancel() before step 6.
    recorder = Recorder(cancel_after={3: {key("ad-1", 0)}})
    engine = engine_for(cache, tokenizer, recorder)
    requests = [request(key(model, 0), prompts[0], model, adapters) for model in MODELS]
    for r in requests:
        engine.submit(r)
    for _ in range(5):
        engine.step()
    assert recorder.finishes[key("ad-1", 0)][0] == "cancelled"
    assert key("ad-1", 0) not in recorder.steps[3]
    engine.cancel(key("ad-2", 0))
    engine.step()
    assert key("ad-2", 0) not in recorder.steps[5]
    assert recorder.finishes[key("ad-2", 0)][0] == "cancelled"
    while engine.step():
        pass

    for model in ["ad-1", "ad-2"]:
        cancelled = recorder.answer(key(model, 0))
        assert alone[key(model, 0)].text.startswith(cancelled.text)
    # Two tokens in the first step (its prefill's and its first decode's), one in each after.
    assert recorder.answer(key("ad-1", 0)).completion_tokens == 4
    for model in [None, "ad-0", "ad-3"]:
        assert recorder.answer(key(model, 0)) == alone[key(model, 0)], model


def test_stop_strings_end_the_answer_before_them_and_nothing_of_them_is_sent(
    cache, tokenizer, adapters, prompts, alone
):
    story = alone[key("ad-0", 1)].text
    assert alone[key("ad-0", 1)].finish_reason == "length"
    cut = len(story) // 2
    stop = story[cut : cut + 4]
    # A stop string whose start the answer ends with is held back, then sent at the end.
    tail = story[-3:] + "\u2603"
    recorder = Recorder()
    engine = engine_for(cache, tokenizer, recorder)
    requests = [
        request("cut", prompts[1], "ad-0", adapters, stop=("never there", stop)),
        request("tail", prompts[1], "ad-0", adapters, stop=(tail,)),
        request("eot", prompts[0], None, adapters, stop=("never there",)),
        request("length", prompts[1], None, adapters, max_new_tokens=5),
    ]
    serve(engine, requests)

    cut_answer = recorder.answer("cut")
    assert cut_answer.text == story[: story.index(stop)]
    assert cut_answer.finish_reason == "stop"
    assert 0 < cut_answer.completion_tokens < NEW_TOKENS
    assert recorder.answer("tail") == alone[key("ad-0", 1)]
    # The base's short answer ends at its end-of-turn token, which is not counted.
    assert alone[key(None, 0)].finish_reason == "stop"
    assert alone[key(None, 0)].completion_tokens < NEW_TOKENS
    assert recorder.answer("eot") == alone[key(None, 0)]
    length = recorder.answer("length")
    assert (length.finish_reason, length.completion_tokens) == ("length", 5)
    assert alone[key(None, 1)].text.startswith(length.text)
    assert recorder.finishes["length"][1] == len(prompts[1])  # prompt_tokens


def test_a_seeded_sampled_answer_is_the_same_alone_and_in_a_batch(
    cache, tokenizer, adapters, prompts
):
    def sampled(name: str) -> Request:
        return request(name, prompts[1], "ad-2", adapters, temperature=0.9, top_p=0.9, seed=7)

    by_itself = Recorder()
    serve(engine_for(cache, tokenizer, by_itself, max_rows=1), [sampled("s")])
    recorder = Recorder()
    engine = engine_for(cache, tokenizer, recorder)
    others = [request(key(m, 0), prompts[0], m, adapters) for m in [None, "ad-0", "ad-2"]]
    serve(engine, [*others, sampled("s")], joining={"s": 2})

    assert recorder.answer("s") == by_itself.answer("s")
    assert by_itself.answer("s").completion_tokens > 4


# --- adapters ---------------------------------------------------------------------------------


def test_loading_an_adapter_stalls_the_batch_by_its_load_time_and_none_in_use_is_evicted(
    cache, tokenizer, adapters, prompts, alone, monkeypatch
):
    """Capacity 2 and three adapters: ad-2 waits until ad-0's short answer ends, then evicts
    ad-0 (never ad-1, still answering); its load, made slow, stalls one step by that long."""
    refuse = artifacts.refuse_unsafe_adapter

    def slow_check(folder):
        time.sleep(0.5)  # a slow disk
        refuse(folder)

    monkeypatch.setattr(artifacts, "refuse_unsafe_adapter", slow_check)
    recorder = Recorder()
    engine = engine_for(cache, tokenizer, recorder, adapter_capacity=2)
    adapter_of = {}
    requests = []
    for model, new_tokens in [(None, 16), ("ad-0", 4), ("ad-1", 16), ("ad-2", 16)]:
        requests.append(request(key(model, 1), prompts[1], model, adapters))
        requests[-1].sampling = Sampling(new_tokens)
        adapter_of[requests[-1].id] = model
        engine.submit(requests[-1])

    durations, loads = [], []
    while True:
        loaded_before = engine.stats["adapter_load_seconds"]
        started = time.monotonic()
        busy = engine.step()
        durations.append(time.monotonic() - started)
        loads.append(engine.stats["adapter_load_seconds"] - loaded_before)
        running = recorder.steps[-1] if recorder.steps else []
        in_use = {adapter_of[i] for i in running} - {None}
        assert in_use <= set(engine.loaded), (running, engine.loaded)
        if not busy:
            break

    joined = next(i for i, running in enumerate(recorder.steps) if key("ad-2", 1) in running)
    assert key("ad-0", 1) in recorder.finishes
    assert key("ad-1", 1) in recorder.steps[joined]  # the batch went on, ad-1 loaded
    assert loads[joined] >= 0.5
    usual = statistics.median(d for d, load in zip(durations, loads, strict=True) if not load)
    # Half a second of slack for a noisy machine (it once ran 0.05 s over without it): a load
    # made twice, or the batch waiting on more than its own load, is still caught.
    allowed = loads[joined] + 4 * usual + 0.5
    assert durations[joined] < allowed, (durations[joined], loads[joined], usual)
    assert engine.stats["adapter_evictions"] == 1
    assert engine.loaded == ["ad-1", "ad-2"]
    for r in requests:
        if r.id != key("ad-0", 1):
            assert recorder.answer(r.id) == alone[r.id], r.id
    assert alone[key("ad-0", 1)].text.startswith(recorder.answer(key("ad-0", 1)).text)


def test_an_adapter_that_fails_to_load_ends_its_request_with_an_error_and_the_batch_goes_on(
    cache, tokenizer, adapters, prompts, alone, tmp_path
):
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    recorder = Recorder()
    engine = engine_for(cache, tokenizer, recorder)
    good = request(key("ad-3", 1), prompts[1], "ad-3", adapters)
    bad = Request("bad", prompts[0], "unsafe", Sampling(NEW_TOKENS), tmp_path)
    broken = Request("broken", [10**9], None, Sampling(NEW_TOKENS))  # no such token
    serve(engine, [good, bad, broken], joining={"bad": 3, "broken": 5})

    reason, _, tokens, error = recorder.finishes["bad"]
    assert (reason, tokens) == ("error", 0)
    assert "The adapter unsafe could not be loaded" in error and "safetensors" in error
    assert recorder.finishes["broken"][0] == "error"
    assert "The model failed" in recorder.finishes["broken"][3]
    assert recorder.answer(good.id) == alone[good.id]


def test_a_dora_adapter_runs_in_a_group_of_its_own_and_answers_as_alone(
    cache, tokenizer, adapters, prompts, alone
):
    by_itself = Recorder()
    dora = request("dora", prompts[1], "dora", adapters)
    serve(engine_for(cache, tokenizer, by_itself, max_rows=1), [dora])
    recorder = Recorder()
    engine = engine_for(cache, tokenizer, recorder)
    others = [request(key(m, 1), prompts[1], m, adapters) for m in [None, "ad-0"]]
    groups = []
    engine.listener.after_step = lambda running: groups.append(engine.stats["groups"]) or ()
    serve(engine, [*others, dora])

    assert max(groups) == 2
    assert recorder.answer("dora") == by_itself.answer("dora")
    assert by_itself.answer("dora").text not in {alone[r.id].text for r in others}
    for r in others:
        assert recorder.answer(r.id) == alone[r.id]


# --- the thread -------------------------------------------------------------------------------


def test_the_thread_serves_what_is_submitted_and_close_stops_it(
    cache, tokenizer, adapters, prompts, alone
):
    done = threading.Event()
    recorder = Recorder()
    finished = recorder.finished

    def finished_and_counted(*args, **kwargs):
        finished(*args, **kwargs)
        if len(recorder.finishes) == 2:
            done.set()

    recorder.finished = finished_and_counted
    engine = engine_for(cache, tokenizer, recorder)
    engine.start()
    for model in [None, "ad-1"]:
        engine.submit(request(key(model, 0), prompts[0], model, adapters))
    assert done.wait(60)
    engine.close()
    assert not engine._thread.is_alive()
    for model in [None, "ad-1"]:
        assert recorder.answer(key(model, 0)) == alone[key(model, 0)]
    with pytest.raises(RuntimeError):
        engine.submit(request("late", prompts[0], None, adapters))


# --- measurements (printed; run with -s) ------------------------------------------------------


@MEASUREMENT
def test_measure_bf16_agreement_of_a_mixed_batch_with_alone(cache, tokenizer, adapters, prompts):
    """In bf16 a row's arithmetic depends on the batch it is in (other matmul blockings), so
    answers may part from the ones alone after a near tie: how often, printed."""

    def bf16_base():
        return load_base_model(SMOLLM2, cache, "none", "cpu").to(torch.bfloat16)

    requests = [
        request(key(model, p), prompts[p], model, adapters)
        for p in range(len(prompts))
        for model in MODELS
    ]
    answers = []
    for max_rows in (1, 32):
        recorder = Recorder()
        recorder.engine = BatchedEngine(bf16_base, tokenizer, recorder, max_rows=max_rows)
        serve(recorder.engine, requests)
        answers.append({r.id: recorder.answer(r.id) for r in requests})
    alone, batched = answers
    same = [r.id for r in requests if alone[r.id] == batched[r.id]]
    agreeing = sum(
        len(_common_prefix(alone[r.id].text, batched[r.id].text)) for r in requests
    ) / sum(len(alone[r.id].text) for r in requests)
    print(
        f"\nbf16: {len(same)}/{len(requests)} answers identical to alone; "
        f"{agreeing:.1%} of the characters before the first difference"
    )
    for r in requests:
        if r.id not in same:
            print(f"  {r.id}: {alone[r.id].text!r} / {batched[r.id].text!r}")


def _common_prefix(a: str, b: str) -> str:
    length = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    return a[:length]


@MEASUREMENT
def test_measure_tokens_per_second_batched_against_one_at_a_time(
    cache, tokenizer, prompts, tmp_path
):
    """16 requests over 8 adapters, 64 new tokens each, greedy: max_rows=32 against 1."""
    model = load_base_model(SMOLLM2, cache, "none", "cpu")
    folders = {}
    for seed in range(8):
        torch.manual_seed(100 + seed)
        lora = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(tmp_path / f"b-{seed}")
        folders[f"b-{seed}"] = tmp_path / f"b-{seed}"
        model = peft_model.unload()
    requests = [
        request(f"r{i}", prompts[i % 2], f"b-{i % 8}", folders, max_new_tokens=64)
        for i in range(16)
    ]
    rates = {}
    for max_rows in (32, 1):
        recorder = Recorder()
        engine = engine_for(cache, tokenizer, recorder, max_rows=max_rows)
        for r in requests:  # adapters loaded before the clock starts
            engine._adapters.name_for(r.adapter, r.folder, set())
        started = time.monotonic()
        serve(engine, requests)
        seconds = time.monotonic() - started
        tokens = sum(recorder.finishes[r.id][2] for r in requests)
        rates[max_rows] = tokens / seconds
        print(f"\nmax_rows={max_rows}: {tokens} tokens in {seconds:.1f} s, {rates[max_rows]:.1f}/s")
    print(f"batched / one at a time: {rates[32] / rates[1]:.2f}x")


def test_bad_sampling_settings_are_refused_by_name():
    for options, name in [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "stop": ("",)}, "stop"),
    ]:
        with pytest.raises(ValueError, match=name):
            Sampling(**options)
