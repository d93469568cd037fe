"""Running a custom evaluation on a worker: the base and the chosen adapters on one eval file.

``POST /v1/evaluations`` creates the row (Evaluation.submit); the Celery task (worker/tasks.py)
calls ``run_evaluation``. Every model answers the same rows through the same scorer as the
end-of-job evaluation (engine/evaluate.py: loss, perplexity, token accuracy, exact match,
normalized exact match, ROUGE-L), on one loaded base with the adapters switched in and out
(worker/serving.py), so comparing five adapters costs one base load.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from django.conf import settings

from engine import data, evaluate, train
from engine.base_models import training_device
from jobs.models import Adapter, Evaluation
from jobs.promotion import PREFERENCE
from loft.observability import bind_log_fields
from loft.storage import StorageError
from worker import serving, tokenized_cache
from worker.base_scores import remember_for
from worker.tokenizer import tokenizer_for
from worker.training import read_examples

logger = logging.getLogger(__name__)
SAMPLES = 20


def run_evaluation(evaluation_id: str) -> None:
    evaluation = Evaluation.objects.select_related("base_model", "file").filter(pk=evaluation_id)
    evaluation = evaluation.first()
    if evaluation is None or not evaluation.claim():
        return  # deleted, or already finished
    bind_log_fields(org_id=evaluation.org_id, job_id=evaluation.job_id)
    try:
        evaluation.succeed(_score_every_model(evaluation))
    except data.DatasetError as error:
        evaluation.fail(error.code, str(error))
    except StorageError as error:
        # The tenant reads a sentence; the endpoint, bucket and key are for the operators' log.
        logger.warning("evaluation %s met a storage error: %s", evaluation.id, error)
        evaluation.fail(
            "storage_unavailable", "Object storage was unavailable; run the evaluation again."
        )
    except Exception as error:  # noqa: BLE001 - the evaluation must end with a sentence
        logger.exception("evaluation %s failed", evaluation.id)
        evaluation.fail(
            "evaluation_failed",
            f"The evaluation failed on the worker ({error.__class__.__name__}); the operators "
            "have the details in its log.",
        )


def _score_every_model(evaluation: Evaluation) -> dict:
    if evaluation.file is None:
        raise data.DatasetError("file_deleted", "The eval file was deleted before it was run.")
    examples, _ = read_examples(evaluation.file)
    tokenizer = tokenizer_for(evaluation.base_model)
    max_length = evaluation.base_model.context_length
    rendered = tokenized_cache.rendered_rows(
        evaluation.file, examples, tokenizer, evaluation.base_model
    )
    # A preference file is scored pair by pair (and on its preferred answers).
    tokenized, _ = train.truncate(rendered, max_length, pairs=True)
    answerable = evaluate.answerable(examples, evaluation.options["max_generations"])
    if not tokenized:
        raise data.DatasetError(
            "no_valid_rows", "No row of the eval file has an assistant turn to score."
        )
    adapters = Adapter.objects.for_org(evaluation.org_id).in_bulk(
        [c["adapter"] for c in evaluation.candidates if c["adapter"]]
    )
    options = {
        "row_tokens": max_length,
        "device": training_device(),
        "max_new_tokens": evaluation.options["max_new_tokens"],
    }
    references = [evaluate.prompt_and_reference(e)[1] for e in answerable]
    probes = (
        evaluate.load_probes()[: settings.LOFT_EVAL_FORGETTING_PROBES]
        if evaluation.options.get("probes")
        else []
    )
    scores, outputs = [], []
    for candidate in evaluation.candidates:
        adapter = adapters.get(candidate["adapter"]) if candidate["adapter"] else None
        if candidate["adapter"] and adapter is None:
            scores.append({"error": "The adapter was deleted before it was evaluated."})
            outputs.append([""] * len(answerable))
            continue
        # Each adapter on the base precision it is served on; the base alone at full precision.
        quantization = adapter.base_quantization if adapter else "none"
        cache = serving.adapter_cache(evaluation.base_model, quantization)

        def use(adapter=adapter, cache=cache):
            key = adapter.id if adapter else None
            return cache.use(key, lambda: serving.adapter_folder(adapter))

        def score(use=use) -> dict:
            with use() as model:
                result, answers = evaluate.score(model, tokenizer, answerable, tokenized, **options)
            return {"scores": asdict(result), "outputs": answers}

        def ask_probes(use=use) -> dict:
            with use() as model:
                return evaluate.ask_probes(model, tokenizer, probes, device=options["device"])

        # The base alone: kept, like a job's, for the next run on the file and the probes.
        remember = (
            remember_for(
                evaluation.base_model,
                quantization,
                options["device"],
                org_id=evaluation.org_id,
                file_sha256=evaluation.file.sha256,
            )
            if adapter is None
            else evaluate.compute_now
        )
        inputs = evaluate.rows_inputs(answerable, tokenized, **options)
        result = remember(evaluate.HELD_OUT, inputs, score)
        # Row by row too: an alias's promotion compares two models on the same rows (on a
        # preference file, pair by pair: whether the preferred answer was the likelier).
        entry = {k: v for k, v in result["scores"].items() if k != "preference_wins"}
        entry["per_row"] = evaluate.per_row(result["outputs"], references)
        if result["scores"].get("preference_wins") is not None:
            entry["per_row"][PREFERENCE] = result["scores"]["preference_wins"]
        if probes:
            inputs = evaluate.probes_inputs(probes, device=options["device"])
            answers = remember(evaluate.PROBES, inputs, ask_probes)["outputs"]
            hits = evaluate.probe_hits(probes, answers)
            entry["probes"] = {"hits": hits, "answered": sum(hits) / len(hits)}
        scores.append(entry)
        outputs.append(result["outputs"])

    samples = []
    for row, example in enumerate(answerable[:SAMPLES]):
        messages, reference = evaluate.prompt_and_reference(example)
        samples.append(
            {
                "line": example.line,
                "prompt": messages[-1].content,
                "reference": reference,
                "outputs": [answers[row] for answers in outputs],
            }
        )
    results = {"models": scores, "samples": samples, "rows": len(examples)}
    if probes:
        results["probes"] = [{"prompt": p.prompt, "expected": p.answer} for p in probes]
    return results
