"""Evaluation: the same held-out rows through the base model and through the adapter.

No Django, no Celery, no S3: a comparison takes a peft model, its tokenizer and the held-out
examples, and returns numbers and samples that the job stores as its evaluation report.

Why both, on the same rows: a fine-tuning job is judged against what it started from. A loss of
0.9 says little alone; 0.9 where the base had 1.4 says the adapter learned the data, and an
adapter worse than its base (on held-out loss or on what it writes) is flagged before anyone
deploys it. The base needs no second model: ``model.disable_adapter()`` turns the LoRA layers
off, so the one model in memory answers as the base, then as the adapter. And its results are the
same for every adapter of it on the same rows, so they go through ``remember`` (below): a worker
keeps them and the next job reads them.

Two kinds of measure:

- teacher-forced, on every held-out row: loss per trained token, perplexity and token accuracy
  (argmax = label), computed on exactly the tokens training learns (assistant turns and their
  end-of-turn token), packed the way training packs them;
- generated, on up to ``max_generations`` chat rows: greedy answers to the conversation up to
  its last assistant turn, scored against that turn by exact match, normalized exact match and
  ROUGE-L. Greedy decoding makes the answers, and so the scores, repeatable.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import artifacts, data, train

SHOWN_SAMPLES = 5

# --- the base's half, kept -------------------------------------------------------------------
#
# The base's results on a set of rows do not depend on the adapter: a worker keeps them
# (worker/base_scores.py) and the next job or evaluation on the same base and rows reads them
# instead of computing them again. ``remember(kind, inputs, compute)`` returns ``compute()``'s
# result, or the one kept for the same inputs; ``inputs`` names everything the result depends on
# here (the rows' content, the settings, this scoring code), and the worker adds the base model,
# its precision, the device and the libraries.
Remember = Callable[[str, dict, Callable[[], dict]], dict]
HELD_OUT, PROBES = "held_out", "probes"


def compute_now(kind: str, inputs: dict, compute: Callable[[], dict]) -> dict:
    """The ``remember`` that keeps nothing."""
    return compute()


def digest(value) -> str:
    """sha256 of a JSON value's canonical text."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# The code a kept result was computed with: a change to how rows are rendered, packed or scored
# gives other keys, so nothing computed by the old code is read by the new.
SCORING_CODE = digest(
    [
        Path(__file__).with_name(name).read_text()
        for name in ("evaluate.py", "data.py", "train.py", "chat_tokenizer.py", "base_models.py")
    ]
)
# exp() of a larger loss overflows a float; no model that loads is anywhere near it.
MAX_LOSS_FOR_PERPLEXITY = 700.0


# --- text metrics -------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lowercase, without punctuation, whitespace collapsed: "Paris." and " paris" agree."""
    kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(kept.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are the same but for surrounding whitespace (chat templates and
    decoding differ in the newlines they leave at the ends)."""
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """F1 of the longest common subsequence of the normalized words (ROUGE-L, β = 1)."""
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = _lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


# --- teacher-forced metrics ---------------------------------------------------------------


@dataclass
class TokenMetrics:
    loss: float | None  # mean cross-entropy per trained token; None without held-out rows
    perplexity: float | None
    token_accuracy: float | None  # share of trained tokens the model ranks first
    tokens: int  # trained tokens measured


@torch.no_grad()
def token_metrics(
    model, examples: list[train.Tokenized], row_tokens: int, device: str
) -> TokenMetrics:
    """Loss, perplexity and token accuracy over the trained tokens of the examples."""
    was_training = model.training
    model.eval()
    loss_total, correct, count = 0.0, 0, 0
    for row in train.pack(examples, train.forward_tokens(row_tokens)) if examples else []:
        logits, targets = train.labelled_logits(model, row.to(device))
        loss_total += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    model.train(was_training)
    if count == 0:
        return TokenMetrics(None, None, None, 0)
    loss = loss_total / count
    return TokenMetrics(
        loss=loss,
        perplexity=math.exp(min(loss, MAX_LOSS_FOR_PERPLEXITY)),
        token_accuracy=correct / count,
        tokens=count,
    )


# --- generation ---------------------------------------------------------------------------


def prompt_and_reference(example: data.Example) -> tuple[list[data.Message], str] | None:
    """The conversation before its last assistant turn, and that turn's text; None for a row
    with nothing to answer (plain text)."""
    answers = [i for i, m in enumerate(example.messages) if m.role == "assistant"]
    if example.text is not None or not answers or answers[-1] == 0:
        return None
    last = answers[-1]
    return example.messages[:last], example.messages[last].content


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: the end-of-sequence token, and the special token the chat
    template closes an assistant turn with (Gemma's <end_of_turn>, Llama 3's <|eot_id|>), which
    is the last token training learns in a turn."""
    probe = data.Example(
        0, "chat", [data.Message("user", "Hi"), data.Message("assistant", "Hello", True)]
    )
    rendered, _ = data.render(probe, tokenizer)
    trained = [t for t, on in zip(rendered.input_ids, rendered.trained, strict=True) if on]
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if trained and (
        trained[-1] in tokenizer.all_special_ids or trained[-1] in tokenizer.added_tokens_decoder
    ):
        ids.add(trained[-1])
    return sorted(ids)


def _prompt_ids(messages: list[data.Message], tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# How many prompts generate together: as many as fit both limits. On a CPU a decoding step
# reads every weight whatever the batch, so 36 probes took 18 s in batches of 8 and 7 s in one
# (SmolLM2-135M, 2 cores); the token limit bounds the KV cache of long prompts on a large model.
GENERATION_BATCH_ROWS = 64
GENERATION_BATCH_TOKENS = 16384


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    examples: list[data.Example],
    max_new_tokens: int,
    device: str,
    max_rows: int = GENERATION_BATCH_ROWS,
) -> list[str]:
    """Greedy answers to each chat example's conversation up to its last assistant turn.

    Batched with left padding, prompts of similar length together (``generation_batches``); the
    KV cache is asked for explicitly, since the model's config turns it off for packed training.
    An answer ends at the end-of-turn token, which is not part of the text. Batching changes no
    answer: one at a time, they are the same (tests/test_evaluate_engine.py).
    """
    from transformers import GenerationConfig

    stops = end_of_turn_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_id,
        use_cache=True,
    )
    prompts = []
    for example in examples:
        pair = prompt_and_reference(example)
        if pair is None:
            raise ValueError(f"line {example.line}: no assistant turn to generate")
        prompts.append(_prompt_ids(pair[0], tokenizer))

    was_training = model.training
    model.eval()
    answers = [""] * len(prompts)
    for chosen in generation_batches([len(p) for p in prompts], max_new_tokens, max_rows):
        ids, mask = _left_padded([prompts[i] for i in chosen], pad_id)
        output = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
        for index, tokens in zip(chosen, output[:, ids.shape[1] :].tolist(), strict=True):
            answers[index] = _decode_until(tokens, stops, tokenizer)
    model.train(was_training)
    return answers


def generation_batches(
    prompt_lengths: list[int],
    max_new_tokens: int,
    max_rows: int = GENERATION_BATCH_ROWS,
    max_tokens: int = GENERATION_BATCH_TOKENS,
) -> list[list[int]]:
    """Prompt indices in batches, shortest prompts first: a batch grows while it has at most
    ``max_rows`` prompts and its padded length (longest prompt and the new tokens) times its
    rows stays within ``max_tokens`` (a single prompt longer than that goes alone)."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: prompt_lengths[i])
    batches: list[list[int]] = []
    for index in order:
        longest = prompt_lengths[index] + max_new_tokens  # sorted: the newest is the longest
        current = batches[-1] if batches else None
        if current and len(current) < max_rows and longest * (len(current) + 1) <= max_tokens:
            current.append(index)
        else:
            batches.append([index])
    return batches


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    return ids, mask


def _decode_until(tokens: list[int], stops: list[int], tokenizer) -> str:
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()


# --- base against adapter -----------------------------------------------------------------


@dataclass
class Scores:
    """One model's results on the held-out rows."""

    loss: float | None
    perplexity: float | None
    token_accuracy: float | None
    tokens: int
    exact_match: float | None  # means over the generated rows; None without any
    normalized_exact_match: float | None
    rouge_l: float | None
    generations: int
    # On preference pairs (engine/data.py format "preference"): the share of pairs where the
    # model gives the preferred answer a higher log-probability than the non-preferred one
    # (each answer's tokens summed, as DPO's reward sums them), for any model, base included;
    # and for an adapter measured against its DPO reference, the implicit reward
    # scale * (log pi(y) - log ref(y)) (the scale is the job's DPO hyperparameter): the share of
    # pairs where the preferred answer's is the higher (TRL's rewards/accuracies) and the mean
    # margin between the two.
    preference_accuracy: float | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    pairs: int = 0
    # Pair by pair, 1.0 where the preferred answer was the likelier (a paired comparison of two
    # models on the same pairs reads them: jobs/promotion.py); not part of a job's report.
    preference_wins: list[float] | None = None


@dataclass
class Sample:
    """One held-out row side by side; ``prompt`` is the last turn before the reference."""

    line: int
    prompt: str
    reference: str
    base_output: str
    adapter_output: str
    base_rouge_l: float
    adapter_rouge_l: float

    @property
    def gain(self) -> float:
        return self.adapter_rouge_l - self.base_rouge_l


@dataclass
class Comparison:
    base: Scores
    adapter: Scores
    samples: list[Sample]  # every generated row, the adapter's largest gain over the base first
    verdict: dict
    forgetting: dict | None = None  # the probe set, base against adapter (see forgetting())
    # Seconds spent on the held-out rows and on the probes (for the job's log, not the report).
    seconds: dict = field(default_factory=dict)

    @property
    def worst(self) -> list[Sample]:
        """The rows where the adapter lost most against the base, worst first."""
        return self.samples[::-1][:SHOWN_SAMPLES]

    def as_dict(self) -> dict:
        return {
            "base": shown(self.base),
            "adapter": shown(self.adapter),
            "verdict": self.verdict,
            "samples": [asdict(s) for s in self.samples],
            "worst": [asdict(s) for s in self.worst],
            "forgetting": self.forgetting,
        }


def shown(scores: Scores) -> dict:
    """A model's scores as a report shows them: without the pair-by-pair wins."""
    return {k: v for k, v in asdict(scores).items() if k != "preference_wins"}


GENERATION_METRICS = {
    "exact_match": exact_match,
    "normalized_exact_match": normalized_exact_match,
    "rouge_l": rouge_l,
}


def per_row(outputs: list[str], references: list[str]) -> dict[str, list[float]]:
    """Each generation metric row by row (the means ``Scores`` holds are their averages): what
    a paired comparison of two models on the same rows needs (jobs/promotion.py)."""
    return {
        name: [metric(o, r) for o, r in zip(outputs, references, strict=True)]
        for name, metric in GENERATION_METRICS.items()
    }


def _scores(tokens: TokenMetrics, outputs: list[str], references: list[str]) -> Scores:
    rows = per_row(outputs, references)

    def mean(name: str) -> float | None:
        return sum(rows[name]) / len(outputs) if outputs else None

    return Scores(
        loss=tokens.loss,
        perplexity=tokens.perplexity,
        token_accuracy=tokens.token_accuracy,
        tokens=tokens.tokens,
        exact_match=mean("exact_match"),
        normalized_exact_match=mean("normalized_exact_match"),
        rouge_l=mean("rouge_l"),
        generations=len(outputs),
    )


def verdict(base: Scores, adapter: Scores) -> dict:
    """The promotion gate: the adapter is flagged when it is worse than its base on held-out
    loss or on the generation score. The generation score is normalized exact match, or ROUGE-L
    when neither model matched a single reference (free-form answers rarely match exactly).
    On preference pairs it is preference accuracy instead, and the loss is left out: DPO
    trades the preferred answers' own likelihood for the gap between the two.
    ``better`` means worse on neither: an adapter equal to its base passes."""
    exact = (base.normalized_exact_match or 0) + (adapter.normalized_exact_match or 0)
    metric = "normalized_exact_match" if exact > 0 else "rouge_l"
    worse_on = []
    if adapter.preference_accuracy is not None and base.preference_accuracy is not None:
        if adapter.preference_accuracy < base.preference_accuracy:
            worse_on.append("preference_accuracy")
        return {"better": not worse_on, "worse_on": worse_on, "generation_metric": metric}
    if base.loss is not None and adapter.loss is not None and adapter.loss > base.loss:
        worse_on.append("loss")
    base_score, adapter_score = getattr(base, metric), getattr(adapter, metric)
    if base_score is not None and adapter_score is not None and adapter_score < base_score:
        worse_on.append(metric)
    return {"better": not worse_on, "worse_on": worse_on, "generation_metric": metric}


def score(
    model,
    tokenizer,
    examples: list[data.Example],
    tokenized: list[train.Tokenized],
    *,
    row_tokens: int,
    device: str,
    max_new_tokens: int,
    reward_scale: float | None = None,
) -> tuple[Scores, list[str]]:
    """One model as it is now (adapter on or off) on evaluation rows: the teacher-forced
    metrics over ``tokenized`` and greedy answers to ``examples`` (rows with an answer), scored
    against their references. Returns the scores and the answers. Preference pairs are scored
    on their preferred answers (a pair's reference is its preferred answer) and by how the
    model ranks their two answers; with ``reward_scale`` (the job's DPO scale) by its implicit
    reward against the reference each pair carries too."""
    answers = [train.Tokenized(t.input_ids, t.labels) for t in tokenized]  # preferred side
    tokens = token_metrics(model, answers, row_tokens, device)
    references = [prompt_and_reference(e)[1] for e in examples]
    budget = answer_budget(tokenizer, references, max_new_tokens)
    outputs = generate_answers(model, tokenizer, examples, budget, device)
    scores = _scores(tokens, outputs, references)
    pairs = [t for t in tokenized if t.rejected is not None]
    if pairs:
        preference_scores(
            scores, train.pair_logps(model, pairs, row_tokens, device), pairs, reward_scale
        )
    return scores, outputs


def preference_scores(
    scores: Scores,
    logps: list[tuple[float, float]],
    pairs: list[train.Tokenized],
    reward_scale: float | None,
) -> None:
    """Fill in the preference measures (see Scores) from each pair's log-probabilities."""
    wins = [float(preferred > rejected) for preferred, rejected in logps]
    scores.pairs = len(pairs)
    scores.preference_wins = wins
    scores.preference_accuracy = sum(wins) / len(wins)
    if reward_scale is None or any(pair.reference is None for pair in pairs):
        return
    margins = [
        reward_scale * ((preferred - reference[0]) - (rejected - reference[1]))
        for (preferred, rejected), reference in zip(
            logps, (p.reference for p in pairs), strict=True
        )
    ]
    scores.reward_accuracy = sum(margin > 0 for margin in margins) / len(margins)
    scores.reward_margin = sum(margins) / len(margins)


def answer_budget(tokenizer, references: list[str], max_new_tokens: int) -> int:
    """New tokens to generate: twice the longest reference and a margin, at most
    ``max_new_tokens``. An answer far longer than every reference scores no better for its
    length, and a base model that rambles on would cost most of the evaluation's time."""
    if not references:
        return max_new_tokens
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return max(1, min(max_new_tokens, 2 * longest + 8))


def answerable(examples: list[data.Example], limit: int) -> list[data.Example]:
    """The first ``limit`` rows that have an assistant turn to generate."""
    return [e for e in examples if prompt_and_reference(e)][:limit]


def compare(
    model,
    tokenizer,
    held_out_examples: list[data.Example],
    held_out_tokenized: list[train.Tokenized],
    *,
    row_tokens: int,
    device: str,
    max_generations: int = 50,
    max_new_tokens: int = 64,
    probes: list[Probe] | None = None,
    remember: Remember = compute_now,
    reward_scale: float | None = None,
) -> Comparison:
    """Score the base (adapter disabled) and the adapter on the same held-out rows, and on the
    forgetting probes when given. The base's results go through ``remember``: computed, or read
    from what a worker kept for the same base and rows.

    ``model`` is a peft model with its adapter active; ``held_out_tokenized`` are the held-out
    examples as training tokenized them, and generation answers the first ``max_generations``
    chat rows of ``held_out_examples``. ``reward_scale``: the DPO job's scale, for the adapter's
    implicit reward against the reference its held-out pairs carry.
    """
    started = time.monotonic()
    chat = answerable(held_out_examples, max_generations)
    options = {"row_tokens": row_tokens, "device": device, "max_new_tokens": max_new_tokens}

    def score_base() -> dict:
        with model.disable_adapter():
            scores, outputs = score(model, tokenizer, chat, held_out_tokenized, **options)
        return {"scores": asdict(scores), "outputs": outputs}

    inputs = rows_inputs(chat, held_out_tokenized, **options)
    kept = remember(HELD_OUT, inputs, score_base)
    base, base_outputs = Scores(**kept["scores"]), kept["outputs"]
    adapter, adapter_outputs = score(
        model, tokenizer, chat, held_out_tokenized, **options, reward_scale=reward_scale
    )

    samples = []
    for example, base_out, adapter_out in zip(chat, base_outputs, adapter_outputs, strict=True):
        messages, reference = prompt_and_reference(example)
        samples.append(
            Sample(
                line=example.line,
                prompt=messages[-1].content,
                reference=reference,
                base_output=base_out,
                adapter_output=adapter_out,
                base_rouge_l=rouge_l(base_out, reference),
                adapter_rouge_l=rouge_l(adapter_out, reference),
            )
        )
    samples.sort(key=lambda s: (-s.gain, -s.adapter_rouge_l))
    held_out_done = time.monotonic()
    lost = (
        forgetting(model, tokenizer, probes, device=device, remember=remember) if probes else None
    )
    seconds = {"held_out": held_out_done - started, "probes": time.monotonic() - held_out_done}
    return Comparison(base, adapter, samples, verdict(base, adapter), lost, seconds)


def rows_inputs(
    chat: list[data.Example],
    tokenized: list[train.Tokenized],
    *,
    row_tokens: int,
    device: str,
    max_new_tokens: int,
) -> dict:
    """What a model's ``score`` on these rows depends on, the model aside: the rows' content
    (as generation prompts them and as training tokenized them), the settings, the code."""
    pairs = [prompt_and_reference(e) for e in chat]
    rows = {
        "chat": [
            [[m.role, m.content] for m in prompt] + [reference] for prompt, reference in pairs
        ],
        "tokenized": [
            [side.input_ids, side.labels] for example in tokenized for side in example.sides()
        ],
    }
    return {
        "rows": digest(rows),
        "row_tokens": row_tokens,
        "device": device,
        "max_new_tokens": max_new_tokens,
        "code": SCORING_CODE,
    }


# --- the base precision: what is served, and what users load -------------------------------


@torch.no_grad()
def on_other_base(
    base,
    adapter_folder: Path,
    tokenizer,
    held_out_examples: list[data.Example],
    held_out_tokenized: list[train.Tokenized],
    *,
    row_tokens: int,
    device: str,
    max_generations: int = 50,
    max_new_tokens: int = 64,
) -> Scores:
    """The saved adapter loaded the standard PEFT way (``PeftModel.from_pretrained``) on
    another copy of its base — a QLoRA adapter on the full-precision base, as a user who
    downloads it would load it — and scored on the same rows as ``compare``."""
    from peft import PeftModel

    artifacts.refuse_unsafe_adapter(adapter_folder)
    model = PeftModel.from_pretrained(base, str(adapter_folder))
    chat = answerable(held_out_examples, max_generations)
    scores, _ = score(
        model,
        tokenizer,
        chat,
        held_out_tokenized,
        row_tokens=row_tokens,
        device=device,
        max_new_tokens=max_new_tokens,
    )
    return scores


def base_precision(trained_on: str, adapter: dict, on_full_precision: Scores | None) -> dict:
    """Which base precision the adapter was trained on and is served on (the same: an adapter
    learns to correct the base it saw), with, for a QLoRA adapter, its scores on the
    full-precision base and the gap to its 4-bit ones (positive: worse on full precision)."""
    report = {"trained_on": trained_on, "served_on": trained_on, "adapter": {trained_on: adapter}}
    if on_full_precision is not None:
        full = shown(on_full_precision)
        report["adapter"]["none"] = full

        def gap(metric: str) -> float | None:
            if full[metric] is None or adapter[metric] is None:
                return None
            return full[metric] - adapter[metric]

        report["gap"] = {"loss": gap("loss"), "exact_match": gap("exact_match")}
    return report


# --- forgetting: what the adapter lost of the base's general knowledge ----------------------

PROBES_PATH = Path(__file__).with_name("probes.jsonl")
PROBE_NEW_TOKENS = 32


@dataclass(frozen=True)
class Probe:
    """A general question any instruction-tuned base answers, with a reference answer (scored
    teacher-forced) and the words a right answer names (scored on the generated text)."""

    prompt: str
    answer: str
    expect: tuple[str, ...]


def load_probes(path: Path = PROBES_PATH) -> list[Probe]:
    """Loft's probe set: a few dozen generic questions with short, unambiguous answers."""
    probes = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            probes.append(Probe(row["prompt"], row["answer"], tuple(row["expect"])))
    return probes


def names_expected(output: str, expect: tuple[str, ...]) -> bool:
    """Whether the answer names one of the expected words, as whole words ("Paris, of course"
    names "paris"; "comparison" does not)."""
    words = f" {normalize(output)} "
    return any(f" {normalize(e)} " in words for e in expect)


def forgetting(
    model,
    tokenizer,
    probes: list[Probe],
    *,
    device: str,
    max_new_tokens: int = PROBE_NEW_TOKENS,
    remember: Remember = compute_now,
) -> dict:
    """Base and adapter on the probe set: the share of probes each answers, their loss on the
    reference answers, and the probes the adapter lost (answered by the base, not by it) or
    gained. Fine-tuning on a narrow task often costs general ability; this shows how much.
    The base's side goes through ``remember``: the probes are the same for every job."""

    def run() -> dict:
        return ask_probes(model, tokenizer, probes, device=device, max_new_tokens=max_new_tokens)

    def run_base() -> dict:
        with model.disable_adapter():
            return run()

    inputs = probes_inputs(probes, device=device, max_new_tokens=max_new_tokens)
    base, adapter = remember(PROBES, inputs, run_base), run()

    def hits(outputs: list[str]) -> list[bool]:
        return probe_hits(probes, outputs)

    def summary(run: dict) -> dict:
        return {"answered": sum(hits(run["outputs"])) / len(probes), "loss": run["loss"]}

    base_outputs, adapter_outputs = base["outputs"], adapter["outputs"]
    base_hits, adapter_hits = hits(base_outputs), hits(adapter_outputs)

    def listed(keep) -> list[dict]:
        return [
            {"prompt": p.prompt, "expected": p.answer, "base_output": b, "adapter_output": a}
            for p, b, a, hb, ha in zip(
                probes, base_outputs, adapter_outputs, base_hits, adapter_hits, strict=True
            )
            if keep(hb, ha)
        ]

    return {
        "probes": len(probes),
        "base": summary(base),
        "adapter": summary(adapter),
        "lost": listed(lambda base_hit, adapter_hit: base_hit and not adapter_hit),
        "gained": listed(lambda base_hit, adapter_hit: adapter_hit and not base_hit),
    }


def ask_probes(
    model, tokenizer, probes: list[Probe], *, device: str, max_new_tokens: int = PROBE_NEW_TOKENS
) -> dict:
    """One model as it is now on the probes: its loss on the reference answers and its greedy
    answers, ``{"loss", "outputs"}`` (the result ``remember`` keeps for a base)."""
    examples = [
        data.Example(
            i + 1,
            "chat",
            [data.Message("user", p.prompt), data.Message("assistant", p.answer, True)],
        )
        for i, p in enumerate(probes)
    ]
    tokenized, _ = train.tokenize(examples, tokenizer, 256)
    tokens = token_metrics(model, tokenized, 256, device)
    outputs = generate_answers(model, tokenizer, examples, max_new_tokens, device)
    return {"loss": tokens.loss, "outputs": outputs}


def probes_inputs(
    probes: list[Probe], *, device: str, max_new_tokens: int = PROBE_NEW_TOKENS
) -> dict:
    """What a model's answers to the probes depend on, the model aside."""
    return {
        "probes": digest([asdict(p) for p in probes]),
        "device": device,
        "max_new_tokens": max_new_tokens,
        "code": SCORING_CODE,
    }


def probe_hits(probes: list[Probe], outputs: list[str]) -> list[bool]:
    """Whether each answer names its probe's expected words."""
    return [names_expected(o, p.expect) for o, p in zip(outputs, probes, strict=True)]
