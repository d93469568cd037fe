"""Merged weights: a base model with a LoRA adapter folded in, saved as a plain model folder.

No Django, no S3: a function on local folders. The result loads with
``AutoModelForCausalLM.from_pretrained`` alone, for tools that load no LoRA adapters. Weights
are read and written as safetensors only: a folder holding pickles is refused, since loading
one runs whatever code it carries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine import artifacts


class MergeError(ValueError):
    """The adapter folder, or what merging produced, is not a safe, loadable model."""


def merge_adapter(
    load_base: Callable[[], object], adapter_folder: Path, output_folder: Path, tokenizer
) -> list[str]:
    """Fold the PEFT adapter in ``adapter_folder`` into a freshly loaded base model (not
    quantized: 4-bit weights cannot take the merged deltas) and save model and ``tokenizer``
    into ``output_folder``. ``load_base`` must load a new model: merging changes it in place.
    Returns the weight files written."""
    from peft import PeftModel

    adapter_folder, output_folder = Path(adapter_folder), Path(output_folder)
    try:
        artifacts.refuse_unsafe_adapter(adapter_folder)
    except ValueError as error:
        raise MergeError(str(error)) from None

    model = PeftModel.from_pretrained(load_base(), str(adapter_folder), is_trainable=False)
    merged = model.merge_and_unload()
    # Loft trains without a KV cache (base_models.load_base_model); whoever runs the merged
    # model generates with one.
    merged.config.use_cache = True
    # transformers 5 writes safetensors only; checked below all the same.
    merged.save_pretrained(output_folder)
    tokenizer.save_pretrained(output_folder)

    if refused := artifacts.pickles_in(output_folder):
        raise MergeError(f"Merging wrote pickled files: {', '.join(refused)}.")
    weights = sorted(path.name for path in output_folder.glob("*.safetensors"))
    if not weights or not (output_folder / "config.json").is_file():
        raise MergeError("Merging wrote no safetensors weights or no config.json.")
    return weights
