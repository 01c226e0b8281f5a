"""Initialisations that need more than the LoRA config: EVA's pass over training data, and LoftQ's
reading of the original weights under a 4-bit base. Both set the adapter in place and leave the base
weights as they were (unlike PiSSA and OLoRA), so the adapter is stored as PEFT saved it."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import warnings

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


# PEFT warns, when a PiSSA/OLoRA config has rsLoRA with rank/alpha patterns, that its own conversion cannot
# store the adapter; save_converted does (alpha x sqrt 2 at rank 2r), so the warning would only mislead.
warnings.filterwarnings("ignore", message="Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training")


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


def save_converted(model, folder: str | os.PathLike, init_dir: str | os.PathLike, adapter: str = "default") -> None:
    """Save a PiSSA or OLoRA adapter converted to a plain LoRA on the original base weights (rank 2r).

    PiSSA/OLoRA train W_res + s·B·A, where W = W_res + s·B0·A0. The same update on W is s·[B, -B0]·[A; A0]
    at rank 2r with the same scaling s (alpha doubled; ×√2 with rsLoRA, whose scaling is alpha/√r).
    PEFT's own conversion (`path_initial_model_for_weight_conversion`) keeps only A and B: it drops DoRA's
    trained magnitude vectors and trainable biases, and refuses rsLoRA with rank/alpha patterns. Here every
    other tensor is kept as trained: the converted weight W + s·B'·A' equals the trained W_res + s·B·A, so
    DoRA's magnitudes (a norm per output of that same weight) and the biases apply unchanged.
    `init_dir`: the adapter PEFT saved right after initialisation (B0, A0), with init_lora_weights=True."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    start = load_file(str(Path(init_dir) / "adapter_model.safetensors"))
    trained = get_peft_model_state_dict(model, adapter_name=adapter)
    out = {}
    for key, value in trained.items():
        if "lora_A" in key:
            value = torch.cat([value, start[key]], dim=0)
        elif "lora_B" in key:
            value = torch.cat([value, -start[key]], dim=1)
        out[key] = value.detach().contiguous()
    config = copy.deepcopy(model.peft_config[adapter])
    grow = 2 ** 0.5 if config.use_rslora else 2.0  # alpha/√r or alpha/r unchanged at rank 2r
    config.init_lora_weights, config.inference_mode = True, True
    config.r *= 2
    config.lora_alpha *= grow
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: v * grow for k, v in (config.alpha_pattern or {}).items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(out, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
