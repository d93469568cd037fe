"""The evaluation engine on its own (engine/evaluate.py): text metrics, held-out token metrics,
greedy generation, and the base-against-adapter comparison with its promotion gate."""

import math

import pytest

from engine import data
from engine import evaluate as E
from engine import train as T
from engine.hyperparameters import TrainConfig

QUESTIONS = [
    ("What is the capital of France?", "Paris."),
    ("Say hello.", "Hello!"),
    ("What is 2 plus 2? Answer with a number only.", "4"),
    ("Name a color.", "Blue."),
]


def chat(line: int, *turns: tuple[str, str]) -> data.Example:
    messages = [data.Message(role, text, role == "assistant") for role, text in turns]
    return data.Example(line, "chat", messages)


@pytest.fixture(scope="module")
def examples() -> list[data.Example]:
    return [chat(i, ("user", q), ("assistant", a)) for i, (q, a) in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def tokenized(examples, tokenizer) -> list[T.Tokenized]:
    result, dropped = T.tokenize(examples, tokenizer, 256)
    assert dropped == 0
    return result


# --- text metrics -------------------------------------------------------------------------


def test_normalizing_lowercases_drops_punctuation_and_collapses_whitespace():
    assert E.normalize("  The  Eiffel\tTower, in PARIS!\n") == "the eiffel tower in paris"
    assert E.normalize("¿Qué?  «Sí».") == "qué sí"
    assert E.normalize("...") == ""


def test_exact_match_forgives_only_surrounding_whitespace():
    assert E.exact_match("Paris.", "Paris.") == 1.0
    assert E.exact_match("\nParis. ", "Paris.") == 1.0
    assert E.exact_match("paris", "Paris.") == 0.0
    assert E.exact_match("", "") == 1.0


def test_normalized_exact_match_forgives_case_whitespace_and_punctuation():
    assert E.normalized_exact_match("  paris ", "Paris.") == 1.0
    assert E.normalized_exact_match("New   York!", "new york") == 1.0
    assert E.normalized_exact_match("Paris, France", "Paris.") == 0.0
    assert E.normalized_exact_match("", "!") == 1.0


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    # LCS "the cat on the mat": 5 of 6 words on each side.
    assert E.rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS "a c": precision 2/4, recall 2/2.
    assert E.rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert E.rouge_l("Paris", "paris!") == 1.0
    assert E.rouge_l("red", "blue") == 0.0


def test_rouge_l_of_empty_texts_is_one_only_when_both_are_empty():
    assert E.rouge_l("", "") == 1.0
    assert E.rouge_l("?!", " ") == 1.0
    assert E.rouge_l("", "Paris") == 0.0
    assert E.rouge_l("Paris", "") == 0.0


# --- prompts and the gate -----------------------------------------------------------------


def test_the_prompt_is_the_conversation_before_the_last_assistant_turn():
    example = chat(
        7,
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Capital of Italy?"),
        ("assistant", "Rome."),
    )
    prompt, reference = E.prompt_and_reference(example)
    assert [m.content for m in prompt] == ["Be brief.", "Hi", "Hello.", "Capital of Italy?"]
    assert reference == "Rome."
    assert E.prompt_and_reference(data.Example(8, "text", text="plain")) is None


def test_answers_end_at_the_chat_templates_end_of_turn_token(tokenizer):
    assert E.end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def scores(loss: float, exact: float, rouge: float) -> E.Scores:
    return E.Scores(loss, math.exp(loss), 0.5, 100, exact, exact, rouge, 10)


def test_the_gate_flags_an_adapter_worse_than_its_base_on_loss():
    verdict = E.verdict(scores(1.0, 0.5, 0.5), scores(1.2, 0.6, 0.6))
    assert verdict == {
        "better": False,
        "worse_on": ["loss"],
        "generation_metric": "normalized_exact_match",
    }


def test_the_gate_scores_generations_by_rouge_l_when_nothing_matches_exactly():
    verdict = E.verdict(scores(1.0, 0.0, 0.4), scores(0.8, 0.0, 0.3))
    assert verdict == {"better": False, "worse_on": ["rouge_l"], "generation_metric": "rouge_l"}
    assert E.verdict(scores(1.0, 0.0, 0.4), scores(0.8, 0.0, 0.5))["better"] is True


# --- with the bundled SmolLM2 -------------------------------------------------------------


@pytest.mark.slow  # ~30 s on 2 cores with its fixture: it trains an adapter first
def test_token_metrics_measure_the_tokens_training_learns(base, tokenized):
    metrics = E.token_metrics(base, tokenized, 256, "cpu")
    assert metrics.loss == pytest.approx(T.held_out_loss(base, tokenized, 256, "cpu"), rel=1e-5)
    assert metrics.perplexity == pytest.approx(math.exp(metrics.loss))
    assert 0.0 <= metrics.token_accuracy <= 1.0
    assert metrics.tokens == sum(
        1 for example in tokenized for label in example.labels[1:] if label != T.IGNORE
    )
    assert E.token_metrics(base, [], 256, "cpu") == E.TokenMetrics(None, None, None, 0)


@pytest.mark.slow  # seconds of the 135M model on the CPU: make test, not make test-fast
def test_batched_greedy_answers_use_the_cache_and_match_one_at_a_time(base, tokenizer, examples):
    steps: list[int] = []
    hook = base.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: steps.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        batched = E.generate_answers(base, tokenizer, examples, 8, "cpu")
    finally:
        hook.remove()
    assert all(width == 1 for width in steps[1:])  # after the prompt, one new token per step
    # Left padding changes nothing: one at a time, the answers are the same.
    assert E.generate_answers(base, tokenizer, examples, 8, "cpu", max_rows=1) == batched
    assert all(answer and "<|im_end|>" not in answer for answer in batched)


def test_prompts_generate_in_batches_of_similar_length_within_the_row_and_token_limits():
    lengths = [30, 5, 12, 7, 400, 6]
    batches = E.generation_batches(lengths, max_new_tokens=10, max_rows=3, max_tokens=200)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches == [[1, 5, 3], [2, 0], [4]]  # shortest first; 3 rows × (30 + 10) > 200
    for batch in batches[:-1]:
        assert len(batch) <= 3 and len(batch) * (max(lengths[i] for i in batch) + 10) <= 200
    assert E.generation_batches([], 10) == []


@pytest.mark.slow  # about 10 s of the 135M model on the CPU: make test, not make test-fast
def test_a_fresh_adapter_scores_exactly_like_its_base(base, tokenizer, examples, tokenized):
    """LoRA's B starts at zero, so before training the adapter is the base, bit for bit."""
    model = T.attach_lora(base, TrainConfig(method="lora", lora_rank=4), None)
    try:
        comparison = E.compare(
            model,
            tokenizer,
            examples,
            tokenized,
            row_tokens=256,
            device="cpu",
            max_new_tokens=8,
            probes=E.load_probes()[:4],
        )
    finally:
        model.unload()
    assert comparison.base == comparison.adapter
    assert comparison.base.generations == len(examples)
    assert comparison.base.loss > 0
    assert comparison.verdict["better"] is True
    assert comparison.verdict["worse_on"] == []
    assert all(s.base_output == s.adapter_output for s in comparison.samples)
    assert {s.line for s in comparison.samples} == {e.line for e in examples}
    report = comparison.as_dict()
    assert set(report) == {"base", "adapter", "verdict", "samples", "worst", "forgetting"}
    assert report["worst"][0] == report["samples"][-1]
    # The forgetting check: same probes, same answers, nothing lost or gained.
    forgetting = report["forgetting"]
    assert forgetting["probes"] == 4 and forgetting["base"] == forgetting["adapter"]
    assert forgetting["lost"] == forgetting["gained"] == []


def test_lofts_probe_set_is_a_few_dozen_general_questions_with_answers():
    probes = E.load_probes()
    assert 30 <= len(probes) <= 60
    assert len({p.prompt for p in probes}) == len(probes)
    # Each reference answer names what a right answer must name.
    assert all(E.names_expected(p.answer, p.expect) for p in probes)


def test_a_probe_is_answered_when_the_answer_names_the_expected_words():
    assert E.names_expected("The capital of France is Paris.", ("paris",))
    assert E.names_expected("It has 8 legs", ("eight", "8"))
    assert not E.names_expected("I prefer comparisons", ("paris",))  # whole words only
    assert not E.names_expected("", ("paris",))


@pytest.mark.slow  # about 10 s of the 135M model on the CPU: make test, not make test-fast
def test_the_base_answers_most_probes_and_a_damaged_model_does_not(base, tokenizer):
    """The probe set measures something: SmolLM2 answers many; with its LoRA layers pushed far
    off (a crude stand-in for catastrophic forgetting) it answers fewer, and they are listed."""
    import torch

    probes = E.load_probes()[:12]
    torch.manual_seed(0)  # lora_A's initialization: the same damage on every run
    model = T.attach_lora(base, TrainConfig(method="lora", lora_rank=4), None)
    try:
        noise = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5, generator=noise)
        result = E.forgetting(model, tokenizer, probes, device="cpu", max_new_tokens=16)
    finally:
        model.unload()
    assert result["base"]["answered"] >= 0.5, result
    assert result["adapter"]["answered"] < result["base"]["answered"], result
    assert result["adapter"]["loss"] > result["base"]["loss"]
    assert result["lost"] and all(
        set(entry) == {"prompt", "expected", "base_output", "adapter_output"}
        for entry in result["lost"]
    )


def test_generation_stops_at_twice_the_longest_reference_and_a_margin(tokenizer):
    short = E.answer_budget(tokenizer, ["2021-03-05", "1999-12-31"], 64)
    assert short == 2 * len(tokenizer("2021-03-05")["input_ids"]) + 8 < 64
    assert E.answer_budget(tokenizer, ["word " * 200], 64) == 64
    assert E.answer_budget(tokenizer, [], 64) == 64
