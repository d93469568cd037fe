"""What a finished adapter folder holds, and the manifest that makes a folder an artifact.

No Django, no S3: functions on local folders. Every multi-file artifact ends with a
``manifest.json`` (sha256 and size of each file), written last: an artifact without its
manifest does not exist.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json")  # what peft loads an adapter from
# Files that torch or pickle would unpickle: loading one runs whatever code it carries.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def pickles_in(folder: Path) -> list[str]:
    return sorted(
        str(path.relative_to(folder))
        for path in Path(folder).rglob("*")
        if path.is_file() and path.suffix in PICKLE_SUFFIXES
    )


def refuse_unsafe_adapter(folder: Path) -> None:
    """Raise ValueError unless ``folder`` is an adapter Loft may load: safetensors weights and
    no pickled file beside them (peft would fall back to unpickling ``adapter_model.bin``)."""
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"The adapter folder has no {ADAPTER_WEIGHTS}.")
    if refused := pickles_in(folder):
        raise ValueError(f"The adapter folder holds pickled files: {', '.join(refused)}.")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path, base: dict | None = None) -> dict:
    """Each file's sha256 and size; for an adapter, also the base it must be loaded on
    (``base_record``)."""
    files = {
        str(path.relative_to(folder)): {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"files": files, "total_bytes": sum(f["bytes"] for f in files.values())}
    if base is not None:
        manifest["base"] = base
    return manifest


# How an adapter's base is loaded, by the API's quantization name.
BASE_PRECISIONS = {"none": "full precision (float32)", "nf4": "4-bit NF4 (bitsandbytes)"}


def base_record(model: str, revision: str, quantization: str) -> dict:
    """The base an adapter was trained on and must be loaded on: a QLoRA adapter learned to
    correct a 4-bit base, a LoRA adapter a full-precision one (Loft serves each so)."""
    return {
        "model": model,
        "revision": revision,
        "quantization": quantization,
        "precision": BASE_PRECISIONS[quantization],
    }


def verify(folder: Path, manifest: dict) -> None:
    """Raise ValueError unless every listed file is present with its size and sha256."""
    for name, expected in manifest["files"].items():
        path = folder / name
        if (
            not path.is_file()
            or path.stat().st_size != expected["bytes"]
            or sha256_of(path) != expected["sha256"]
        ):
            raise ValueError(f"{name} does not match the manifest")


def model_card(
    *,
    name: str,
    base_model: str,
    method: str,
    base_quantization: str,
    hyperparameters: dict,
    data_stats: dict,
    metrics: dict,
    parent: str | None,
    evaluation: dict | None = None,
) -> str:
    """README.md of the adapter folder: what it is, how it was made, how to load it, and what
    it gained (or lost) over its base on held-out rows."""
    rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(hyperparameters.items()))
    data_rows = "\n".join(f"| {key} | {value} |" for key, value in data_stats.items())
    metric_rows = "\n".join(f"| {key} | {value} |" for key, value in metrics.items())
    lineage = f"Continued from adapter `{parent}`.\n\n" if parent else ""
    return f"""---
base_model: {base_model}
library_name: peft
tags: [lora, {method}, loft]
---

# {name}

A LoRA adapter for `{base_model}`, trained by Loft with {method.upper()}.

{lineage}## Use

Trained on the base in **{BASE_PRECISIONS[base_quantization]}**: load it on the base at that
precision, as Loft serves it (`manifest.json` records it under `base`).

```python
{_loading_code(base_model, base_quantization)}
```

The folder holds safetensors weights only; `manifest.json` lists each file's sha256.
{_precision_section(evaluation)}
## Data

| | |
|---|---|
{data_rows}

## Hyperparameters

| | |
|---|---|
{rows}

## Metrics

| | |
|---|---|
{metric_rows}
{_evaluation_section(evaluation)}"""


def _loading_code(base_model: str, quantization: str) -> str:
    if quantization == "nf4":
        return f"""import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
four_bit = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,  # torch.float32 on a CPU
)
base = AutoModelForCausalLM.from_pretrained("{base_model}", quantization_config=four_bit)
model = PeftModel.from_pretrained(base, "path/to/this/folder")"""
    return f"""import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
base = AutoModelForCausalLM.from_pretrained("{base_model}", dtype=torch.float32)
model = PeftModel.from_pretrained(base, "path/to/this/folder")"""


def _precision_section(evaluation: dict | None) -> str:
    """A QLoRA adapter's scores on the full-precision base beside those on its 4-bit base."""
    report = (evaluation or {}).get("base_precision") or {}
    if "gap" not in report:
        return ""

    def shown(value) -> str:
        return "–" if value is None else f"{value:.4g}"

    trained, full = report["adapter"][report["trained_on"]], report["adapter"]["none"]
    return f"""
On the full-precision base instead (the standard `PeftModel.from_pretrained` on an unquantized
base), held-out loss is {shown(full["loss"])} against {shown(trained["loss"])} on the 4-bit base,
and exact match {shown(full["exact_match"])} against {shown(trained["exact_match"])}.
"""


EVALUATION_ROWS = [
    ("held-out loss", "loss"),
    ("perplexity", "perplexity"),
    ("token accuracy", "token_accuracy"),
    ("exact match", "exact_match"),
    ("normalized exact match", "normalized_exact_match"),
    ("ROUGE-L", "rouge_l"),
]


def _evaluation_section(evaluation: dict | None) -> str:
    """Base against adapter on the same held-out rows (eval_report.json has the samples)."""
    if not evaluation:
        return ""

    def shown(value) -> str:
        return "–" if value is None else f"{value:.4g}"

    rows = "\n".join(
        f"| {label} | {shown(evaluation['base'][key])} | {shown(evaluation['adapter'][key])} |"
        for label, key in EVALUATION_ROWS
    )
    verdict = evaluation["verdict"]
    gate = (
        "The adapter is not worse than its base on held-out data."
        if verdict["better"]
        else f"**Worse than its base on: {', '.join(verdict['worse_on'])}.**"
    )
    return f"""
## Evaluation on held-out rows

| | base | adapter |
|---|---|---|
{rows}

{gate} Samples, best and worst first: `eval_report.json`.
{_forgetting_section(evaluation.get("forgetting"))}"""


def _forgetting_section(forgetting: dict | None) -> str:
    """What the adapter lost of the base's general knowledge (Loft's probe set)."""
    if not forgetting:
        return ""
    lost = "".join(f"\n- {p['prompt']}" for p in forgetting["lost"]) or "\n- none"
    return f"""
## General knowledge (forgetting check)

Of {forgetting["probes"]} general questions, the base answers \
{forgetting["base"]["answered"]:.0%} and the adapter {forgetting["adapter"]["answered"]:.0%}. \
Answered by the base but no longer by the adapter:{lost}
"""


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
