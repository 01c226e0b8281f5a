"""A user's .gguf that cannot become the model it claims is refused with one message, before the slow
conversion and before anything is cached: an architecture transformers does not load, a header that lies
about its tensors, blocks without tensors, and (found only while converting) any weight the file lacks."""

from __future__ import annotations

import functools

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from loralab.config.schema import ModelSpec  # noqa: E402
from loralab.engine import models  # noqa: E402
from loralab.errors import ModelError  # noqa: E402

LLAMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def llama_names(blocks: int) -> list[str]:
    return ["token_embd.weight", "output_norm.weight",
            *(f"blk.{b}.{t}.weight" for b in range(blocks) for t in LLAMA_BLOCK)]


def write_gguf(path, arch: str, names: list[str], block_count: int) -> None:
    """A GGUF whose header is what the checks read; its tensors are tiny placeholders (never converted)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(block_count)
    for n in names:
        w.add_tensor(n, np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def refused(path, tmp_path) -> str:
    with pytest.raises(ModelError) as err:
        models.local_folder(ModelSpec(name=path.name), tmp_path)  # what validate and run both call first
    return str(err.value) + " | " + " ".join(f"{p.message} {p.fix}" for p in err.value.problems)


def test_a_complete_llama_header_passes(tmp_path):
    write_gguf(tmp_path / "ok.gguf", "llama", llama_names(2), 2)
    assert models.local_folder(ModelSpec(name="ok.gguf"), tmp_path) == models.gguf_cache_dir(tmp_path / "ok.gguf")


def test_an_architecture_transformers_cannot_load_is_refused(tmp_path):
    write_gguf(tmp_path / "rwkv.gguf", "rwkv6", ["token_embd.weight", "blk.0.time_mix_key.weight"], 1)
    msg = refused(tmp_path / "rwkv.gguf", tmp_path)
    assert "'rwkv6' is not one transformers can load" in msg and "llama" in msg and "save_pretrained" in msg


def test_a_header_that_lies_about_its_tensors_is_refused(tmp_path):
    write_gguf(tmp_path / "liar.gguf", "gpt2", llama_names(2), 2)  # gpt2 has attn_qkv, not attn_q/k/v or ffn_gate
    msg = refused(tmp_path / "liar.gguf", tmp_path)
    assert "says architecture 'gpt2'" in msg and "blk.0.attn_q.weight" in msg and "convert" in msg


def test_a_llama_gguf_missing_its_block_tensors_is_refused(tmp_path):
    write_gguf(tmp_path / "hollow.gguf", "llama", ["token_embd.weight", "output_norm.weight"], 30)
    msg = refused(tmp_path / "hollow.gguf", tmp_path)
    assert "30 of its 30 blocks have no tensors (first: blk.0)" in msg and "random weights" in msg
    write_gguf(tmp_path / "half.gguf", "llama", llama_names(2), 4)  # two of four blocks present
    assert "2 of its 4 blocks have no tensors (first: blk.2)" in refused(tmp_path / "half.gguf", tmp_path)


VOCAB = 400  # the built-in tokenizer's first tokens (its specials and bytes) and the merges among them: quick to read


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> dict:
    src = gguf.GGUFReader(models.builtin_gguf_path())

    def strings(name: str, keep=lambda i: True) -> list[str]:  # read part by part: contents() decodes all 49k
        f = src.fields[name]
        return [bytes(f.parts[i]).decode() for n, i in enumerate(f.data) if keep(n)]

    out = {}
    for name, field in src.fields.items():
        if name.startswith("tokenizer.") and not name.endswith(("tokens", "token_type", "merges", "chat_template")):
            out[name] = [field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None]
    tokens = strings("tokenizer.ggml.tokens", lambda n: n < VOCAB)
    have = set(tokens)
    kinds = src.fields["tokenizer.ggml.token_type"]
    arr, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    out["tokenizer.ggml.tokens"] = [tokens, arr, string]
    out["tokenizer.ggml.token_type"] = [[int(kinds.parts[i][0]) for i in kinds.data[:VOCAB]], arr, kinds.types[-1]]
    out["tokenizer.ggml.merges"] = [[m for m in strings("tokenizer.ggml.merges")
                                     if all(part in have for part in m.split(" ")) and m.replace(" ", "") in have], arr, string]
    return out


def tiny_llama_gguf(path, drop: tuple[str, ...] = ()) -> None:
    """A real (tiny) llama GGUF with the built-in model's tokenizer: one block of width 8."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (value, vtype, sub) in tiny_tokenizer().items():
        w.add_key_value(name, value, vtype, sub)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    rng = np.random.default_rng(0)
    vocab = len(tiny_tokenizer()["tokenizer.ggml.tokens"][0])
    shapes = {"token_embd.weight": (vocab, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8),
              "blk.0.ffn_down.weight": (8, 16),
              **{f"blk.0.attn_{t}.weight": (8, 8) for t in ("q", "k", "v", "output")}}
    for name, shape in shapes.items():
        if name not in drop:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_weight_the_file_lacks_is_never_filled_in_at_random_and_cached(tmp_path):
    """blk.0 is there (the header check passes) but without its ffn_down: transformers would initialise
    that weight at random; the conversion refuses instead and leaves no cache folder."""
    tiny_llama_gguf(tmp_path / "whole.gguf")
    models.check_gguf(tmp_path / "whole.gguf", "whole.gguf")
    tiny_llama_gguf(tmp_path / "holed.gguf", drop=("blk.0.ffn_down.weight",))
    models.check_gguf(tmp_path / "holed.gguf", "holed.gguf")  # the header alone cannot tell
    target = tmp_path / "cache" / "holed"
    with pytest.raises(ModelError) as err:
        models.convert_gguf(tmp_path / "holed.gguf", target, "holed.gguf", log=lambda _: None)
    assert "lacks 1 of the model's weights (model.layers.0.mlp.down_proj.weight)" in str(err.value)
    assert not list((tmp_path / "cache").glob("holed*"))  # no folder, no half-written temporary
    done = models.convert_gguf(tmp_path / "whole.gguf", tmp_path / "cache" / "whole", "whole.gguf", log=lambda _: None)
    assert (done / "model.safetensors").is_file()  # the same file with its weight converts


def test_a_few_tensors_the_gguf_table_does_not_know_are_not_taken_for_a_lie(tmp_path):
    """A newer llama.cpp may write an optional tensor the installed gguf package's table lacks: one such
    name among many is let through (the conversion's own check still catches a missing weight)."""
    write_gguf(tmp_path / "newer.gguf", "llama", llama_names(2) + ["blk.0.some_new_tensor.weight"], 2)
    models.check_gguf(tmp_path / "newer.gguf", "newer.gguf")
