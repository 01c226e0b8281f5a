"""Initialisations that need more than the LoRA config: EVA's pass over training data, and LoftQ's
reading of the original weights under a 4-bit base. Both set the adapter in place and leave the base
weights as they were (unlike PiSSA and OLoRA), so the adapter is stored as PEFT saved it."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from loralab.engine.data import Encoded
from loralab.engine.train import collate

# EVA fits the top r*rho right-singular vectors of each layer's inputs, over the answer tokens (PEFT's label
# mask). 8 examples a batch: about 100 answer tokens on the built-in data, above the 16 components of r = 8,
# rho = 2 (a batch with fewer tokens than components is skipped by PEFT).
EVA_BATCH = 8
EVA_BATCHES = 16  # distinct batches: the first 128 training examples, cycled until the SVD has converged
# PEFT cycles the batches until every layer's components have settled (cosine similarity >= tau), with no
# limit of its own. The built-in model (r = 8, q/k/v) settles in 27 passes; a run that does not settle in this
# many fails with a message instead of looping.
EVA_MAX_PASSES = 100


class EvaDidNotConverge(RuntimeError):
    pass


def eva_batches(examples: Sequence[Encoded], pad_id: int, device) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (input_ids, attention_mask, labels with -100 over prompts and padding): what
    PEFT's EVA expects; the labels keep the SVD to the answer tokens, as training's loss is."""
    use = list(examples[:EVA_BATCH * EVA_BATCHES])
    return [collate(use[i:i + EVA_BATCH], pad_id, device) for i in range(0, len(use), EVA_BATCH)]


def eva_init(model, batches: list[dict[str, torch.Tensor]]) -> None:
    """EVA (PEFT's initialize_lora_eva_weights) on a PEFT model made with init_lora_weights="eva": A from
    the SVD of each layer's inputs, ranks redistributed by explained variance (the adapter config's
    rank_pattern and alpha_pattern say where they went)."""
    from peft import initialize_lora_eva_weights

    passes = 0

    def forward(m, inputs):
        nonlocal passes
        passes += 1
        if passes > EVA_MAX_PASSES:
            raise EvaDidNotConverge(
                f"EVA's SVD of the layer inputs did not settle within {EVA_MAX_PASSES} passes over {len(batches)} "
                f"batch(es) of training examples; fix: use more training examples (data.train_size), a lower "
                f"lora.r, or another lora.init")
        return m(**inputs)

    # PEFT prints a line for each batch with fewer tokens than components: not for our output (--json).
    with contextlib.redirect_stdout(io.StringIO()):
        initialize_lora_eva_weights(model, dataloader=batches, forward_fn=forward, show_progress_bar=False)


def weights_folder(path: str, revision: str | None) -> str:
    """The folder of the base model's safetensors: a local folder as it is, a hub id from the local cache."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, local_files_only=True)


def loftq_init(model, folder: str, adapter: str = "default") -> None:
    """LoftQ on a PEFT model over a 4-bit base (PEFT's replace_lora_weights_loftq): A and B set to the best
    rank-r fit of what 4-bit quantization took from each weight, read from the original safetensors; the
    quantized base is not changed. PEFT computes this on CUDA only (refused elsewhere by preflight).

    PEFT fits B·A to the quantization error, but the layer adds scaling·B·A (alpha/r, or alpha/√r with
    rsLoRA; PEFT issue #1982): A and B are each divided by √scaling, so the adapter starts where LoftQ
    puts it (base + update ≈ the original weights) whatever alpha is, with A and B still balanced."""
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    replace_lora_weights_loftq(model, model_path=os.fspath(folder), adapter_name=adapter)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear4bit) and adapter in module.lora_A:
                root = float(module.scaling[adapter]) ** 0.5
                module.lora_A[adapter].weight.div_(root)
                module.lora_B[adapter].weight.div_(root)
