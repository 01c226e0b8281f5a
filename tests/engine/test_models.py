"""Model loading (safetensors only, clear errors) and LoRA target resolution across architectures."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from loralab.errors import ModelError
from loralab.engine.models import linear_module_names, load_base_model, resolve_target_modules
from loralab.config.schema import ModelSpec


@pytest.fixture(scope="module")
def neox(tiny_neox):
    return AutoModelForCausalLM.from_pretrained(tiny_neox)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def test_fused_name_kept_on_neox(neox):
    assert resolve_target_modules(neox, ["query_key_value"]) == (["query_key_value"], None)


def test_fused_name_mapped_on_llama_with_a_note(llama):
    targets, note = resolve_target_modules(llama, ["query_key_value"])
    assert targets == ["q_proj", "k_proj", "v_proj"]
    assert "query_key_value" in note and "q_proj, k_proj, v_proj" in note


def test_split_names_mapped_on_neox(neox):
    targets, note = resolve_target_modules(neox, ["q_proj", "v_proj"])
    assert targets == ["query_key_value"] and note


def test_all_linear_passes_through(llama):
    assert resolve_target_modules(llama, ["all-linear"]) == ("all-linear", None)


def test_unknown_name_lists_the_models_layers(llama):
    with pytest.raises(ModelError) as info:
        resolve_target_modules(llama, ["q_proj", "attn_out"], where="runs.A.lora.target_modules")
    text = str(info.value)
    assert "runs.A.lora.target_modules" in text and "'attn_out'" in text
    for name in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"):
        assert name in text
    assert "lm_head" not in text


def test_linear_module_names(neox):
    assert linear_module_names(neox) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]


def test_local_folder_loads_in_fp32_on_cpu(tiny_llama, tmp_path):
    bm = load_base_model(ModelSpec(name=str(tiny_llama)), tmp_path, device="cpu", log=lambda m: None)
    assert bm.arch == "llama" and bm.dtype == torch.float32 and bm.device.type == "cpu"
    assert bm.fingerprint.startswith("local-") and bm.tokenizer.pad_token_id is not None


def test_a_cpu_base_is_not_kernelized_and_computes_what_transformers_default_computes(tiny_llama, tmp_path):
    """transformers' Hub kernels have no CPU kernel: loralab loads a CPU base without them (no layer wrapped,
    nothing re-kernelized at each train()/eval() switch), and its logits are those of transformers' default."""
    bm = load_base_model(ModelSpec(name=str(tiny_llama)), tmp_path, device="cpu", log=lambda m: None)
    default = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert not bm.model.use_kernels
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        for mode in (True, False):  # dropout is 0: both modes compute the same, switching must not change it
            bm.model.train(mode), default.train(mode)
            assert torch.equal(bm.model(input_ids=ids).logits, default(input_ids=ids).logits)


def test_pickle_only_folder_is_refused(tiny_llama, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        load_base_model(ModelSpec(name=str(folder)), tmp_path, log=lambda m: None)


def test_folder_without_weights(tiny_llama, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights"):
        load_base_model(ModelSpec(name=str(folder)), tmp_path, log=lambda m: None)


def test_hub_id_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError) as info:
        load_base_model(ModelSpec(name="nobody/no-such-model-xyz"), tmp_path, log=lambda m: None)
    assert "nobody/no-such-model-xyz" in str(info.value) and "local folder" in str(info.value)


def test_missing_relative_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(ModelSpec(name="./models/none"), tmp_path, log=lambda m: None)


def test_unknown_builtin(tmp_path):
    with pytest.raises(ModelError, match="unknown built-in"):
        load_base_model(ModelSpec(name="builtin:gpt-9"), tmp_path, log=lambda m: None)


def test_a_users_gguf_file_is_converted_once_like_the_built_in(tmp_path, monkeypatch):
    """`model: my.gguf` names a GGUF file: validate reads its header, and the first run converts it into
    the cache (the same conversion as the built-in model's), named by the file, its size and time."""
    from loralab.config.schema import ModelSpec
    from loralab.engine import models

    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(models.builtin_gguf_path().read_bytes()[:4096])  # a truncated GGUF: its header is cut
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        models.local_folder(ModelSpec(name="my.gguf"), tmp_path)
    gguf.unlink()
    gguf.symlink_to(models.builtin_gguf_path())
    converted = []
    monkeypatch.setattr(models, "convert_gguf", lambda src, target, what, log: converted.append((src, target)) or target)
    monkeypatch.setattr(models, "_folder_fingerprint", lambda folder: "f")
    ref, fingerprint = models.resolve_model(ModelSpec(name="my.gguf"), tmp_path)
    [(src, target)] = converted
    assert src == gguf and target == models.gguf_cache_dir(gguf) and ref == str(target)
    assert target.parent == tmp_path / "cache" / "loralab" / "models" and target.name.startswith("gguf-my-")
    assert fingerprint == "gguf-f"


def test_layers_beyond_a_users_gguf_are_refused_from_its_header_before_any_conversion(tmp_path, monkeypatch):
    """`lora.layers` is checked against the block count in a GGUF's header, by validate and by run before the
    file is converted (run found it only after a 33 s conversion)."""
    from gguf import GGUFWriter
    from typer.testing import CliRunner

    from loralab.cli import app
    from loralab.engine import models

    w = GGUFWriter(str(tmp_path / "my.gguf"), "llama")
    w.add_block_count(4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert models.gguf_blocks(tmp_path / "my.gguf") == 4
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("converted before the check"))
    f = tmp_path / "g.yaml"
    f.write_text("name: g\nmodel: my.gguf\ndata: {builtin: stdlib-docstrings, train_size: 8, eval_size: 4}\n"
                 "runs:\n  A: {lora: {layers: [0, 3]}}\n  B: {lora: {layers: [2, 4]}}\n")
    for command in (["validate", str(f)], ["run", str(f), "-w", str(tmp_path / "ws")]):
        out = CliRunner().invoke(app, command)
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and "runs.B.lora.layers" in text and "runs.A.lora" not in text, out.output
        assert "the model has 4 blocks (0 to 3), by its GGUF header" in text and "[2, 4]" in text, out.output
    assert not (tmp_path / "ws").exists()


def test_layers_beyond_the_built_in_model_are_refused_from_its_gguf_header(tmp_path, monkeypatch):
    """The built-in model is a GGUF until its first run converts it: validate reads its 30 blocks from the header."""
    from typer.testing import CliRunner

    from loralab.cli import app
    from loralab.engine import models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # not converted here
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("converted before the check"))
    f = tmp_path / "b.yaml"
    f.write_text("name: b\ndata: {builtin: stdlib-docstrings, train_size: 8, eval_size: 4}\n"
                 "runs:\n  A: {lora: {layers: [29, 30]}}\n")
    out = CliRunner().invoke(app, ["validate", str(f)])
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and "runs.A.lora.layers" in text and "30 blocks (0 to 29)" in text, out.output
