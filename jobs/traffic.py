"""Training files made of traffic: an alias's (or a model's) stored completions that its users
rated up or corrected, as chat rows, a correction replacing the answer it corrects.

Asking for one (``request_training_file``, the API's ``POST /v1/files/from_completions`` and the
Traffic page) creates the File at once, status ``uploaded``, with what to select in its report;
a worker builds its bytes (``build``) and validates them as any upload (jobs/datasets.py), so
that no web thread reads earlier training files. A lost message is sent again like any file's
(worker/maintenance.py), and the build starts over from the same selection.

Rows whose prompt (the conversation before the answer) was already in a training file of the
alias's adapters — the one it serves, those it served before, and their ancestors — are left
out: the alias has learned those, and the same prompt twice would weigh them double. Within
the selection, the latest answer of a prompt wins.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from engine import data
from jobs import tasks
from jobs.models import Adapter, File, StoredCompletion
from jobs.models.aliases import Alias
from loft import storage

# What a row may be selected for: a thumb up, or a correction (the corrected answer is used).
SELECTIONS = ("rated_up", "corrected")


class TrafficError(Exception):
    """A selection that cannot make a training file, in a sentence."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def request_training_file(
    org,
    *,
    alias: str | None = None,
    model: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    select: tuple[str, ...] = SELECTIONS,
) -> File:
    """A new File (purpose fine-tune) to be built from the stored completions selected; raises
    TrafficError when nothing could be selected."""
    if bool(alias) == bool(model):
        raise TrafficError("Name the alias, or the model, whose traffic to learn from.", "alias")
    named = Alias.objects.for_org(org).filter(name=alias).select_related("adapter").first()
    if alias and named is None:
        raise TrafficError(f"No alias named {alias!r}.", "alias")
    unknown = sorted(set(select) - set(SELECTIONS))
    if not select or unknown:
        raise TrafficError(f"select holds {' and/or '.join(SELECTIONS)}.", "select")
    spec = {
        "alias": alias or "",
        "model": model or "",
        "created_after": created_after.isoformat() if created_after else None,
        "created_before": created_before.isoformat() if created_before else None,
        "select": sorted(select),
    }
    matching = selected(org, spec).count()
    if matching == 0:
        raise TrafficError(
            f"No stored completion of {alias or model} is {_selection_words(spec)} in that time; "
            "rate or correct some first.",
            "select",
        )
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    with transaction.atomic():
        file = File(
            org=org,
            filename=f"traffic-{alias or model}-{stamp}.jsonl".replace(":", "_"),
            purpose=File.Purpose.FINE_TUNE,
            bytes=0,
            sha256="",
            requested_format="chat",
            report={"traffic": spec},
            # Tokens counted with the tokenizer the alias's adapters are trained with.
            base_model=named.adapter.base_model if named else None,
        )
        file.s3_key = File.object_key(org.id, file.id)
        file.save()
        tasks.validate_file(file.id)
    return file


def selected(org, spec: dict):
    """The stored completions ``spec`` selects, oldest first."""
    rows = StoredCompletion.objects.for_org(org)
    rows = rows.filter(alias=spec["alias"]) if spec["alias"] else rows.filter(model=spec["model"])
    if spec["created_after"]:
        rows = rows.filter(created_at__gte=datetime.fromisoformat(spec["created_after"]))
    if spec["created_before"]:
        rows = rows.filter(created_at__lt=datetime.fromisoformat(spec["created_before"]))
    return rows.filter(learnable(spec["select"])).order_by("created_at", "id")


def learnable(select=SELECTIONS) -> Q:
    """The stored completions a training file takes: rated up, corrected, or (the default)
    either. Continual policies count the same ones (jobs/continual.py)."""
    wanted = Q()
    if "rated_up" in select:
        wanted |= Q(rating=1)
    if "corrected" in select:
        wanted |= ~Q(correction="")
    return wanted


def is_pending(file: File) -> bool:
    """Whether ``file`` is a traffic file whose bytes are still to be built."""
    return "traffic" in file.report and not file.sha256


def build(file: File) -> None:
    """Write the traffic file's rows to its object and record its size; a worker's, before the
    file is validated. Raises data.DatasetError when no row is left to train on."""
    spec = file.report["traffic"]
    already = prompts_learned_by(file.org, spec["alias"]) if spec["alias"] else set()
    rows: dict[str, dict] = {}  # by prompt: the latest answer wins
    considered = already_trained = 0
    for completion in selected(file.org, spec).iterator():
        considered += 1
        key = prompt_key(completion.messages)
        if key in already:
            already_trained += 1
            continue
        rows.pop(key, None)
        rows[key] = {
            "messages": [{"role": m["role"], "content": m["content"]} for m in completion.messages]
            + [{"role": "assistant", "content": completion.training_answer}]
        }
    summary = {
        **spec,
        "completions": considered,
        "already_trained": already_trained,
        "repeated_prompts": considered - already_trained - len(rows),
        "rows": len(rows),
    }
    if not rows:
        raise data.DatasetError(
            "no_rows",
            f"All {considered} selected completions repeat prompts the alias's adapters were "
            "already trained on; there is nothing new to learn.",
        )
    payload = io.BytesIO()
    for row in rows.values():
        payload.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    content = payload.getvalue()
    storage.put_bytes(file.s3_key, content, "application/jsonl")
    file.bytes = len(content)
    file.sha256 = hashlib.sha256(content).hexdigest()
    file.report = {"traffic": summary}
    file.save(update_fields=["bytes", "sha256", "report"])


def prompt_key(messages) -> str:
    """The conversation before the answer (roles and stripped texts), as a digest: what makes
    two rows teach the same thing. ``messages``: dicts, or engine.data Messages."""
    turns = [
        (m["role"], m["content"]) if isinstance(m, dict) else (m.role, m.content) for m in messages
    ]
    while turns and turns[-1][0] == "assistant":
        turns.pop()
    payload = json.dumps([[role, content.strip()] for role, content in turns])
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def prompts_learned_by(org, alias_name: str) -> set[str]:
    """The prompts of every training file of the adapters the alias serves or has served, and
    of their ancestors."""
    alias = Alias.objects.for_org(org).filter(name=alias_name).first()
    if alias is None:
        return set()
    ids = {alias.adapter_id}
    for move in alias.moves.all():
        ids |= {move.from_adapter, move.to_adapter} - {""}
    files = {
        file.pk: file
        for served in Adapter.objects.for_org(org).filter(pk__in=ids).select_related("job")
        for ancestor in served.lineage()
        if (file := ancestor.training_file()) is not None
    }
    prompts: set[str] = set()
    for file in files.values():
        _, examples = data.open_dataset(
            storage.iter_object(file.s3_key),
            filename=file.filename,
            forced_format=file.requested_format or None,
        )
        for example in examples:
            if isinstance(example, data.Example) and example.messages:
                prompts.add(prompt_key(example.messages))
    return prompts


def _selection_words(spec: dict) -> str:
    words = {"rated_up": "rated up", "corrected": "corrected"}
    return " or ".join(words[s] for s in spec["select"])
