"""Official RWKV-6 / RWKV-7 checkpoints -> GGUF, the file llama.cpp (and ollama, which runs llama.cpp) loads.

llama.cpp's own converter (convert_hf_to_gguf.py, classes Rwkv6Model and Rwkv7Model) reads Hugging Face / fla
folders; this writes the same file from official names in one step, through the `gguf` package (GGUFWriter, the
tensor names of gguf.constants, gguf.quants for Q8_0). What it writes, as that converter does:

    metadata  architecture rwkv6 / rwkv7: sizes, LoRA ranks, wkv head size, layer-norm eps 1e-5, a context
              length of 2**20 (RWKV has no limit), head count 0 (required, unused)
    vocab     the World vocabulary, tokenizer model "rwkv": id 0 "<s>" (control), ids 1..65529 as Python's
              bytes repr without b'' (llama.cpp unescapes \\t \\n \\r \\xNN and \\<char>), the embedding's
              remaining rows "[PAD<i>]" (unused); bos = eos = 0, eot = 261 ("\\n\\n", the blank line that ends a
              chat turn), and a chat template for the World chat format
    tensors   GGUF names; [1, 1, C] vectors flattened to [C]; LoRA matrices transposed ([in, r] -> [r, in]; RWKV-6's
              time_maa_w2 [5, r, C] -> [5, C, r]); the token-shift mixes stacked into one `time_mix_lerp_fused`
              [n, 1, 1, C] (RWKV-6: w k v r g; RWKV-7: r w k v a g); RWKV-7's r_k [H, N] flattened to [C], and
              block 0's unused v0/v1/v2 written as copies of a0/a1/a2 (llama.cpp requires them in every block)
    types     the asked type (f32, f16, q8_0) for matrices; f32 for 1-D tensors and for those llama.cpp keeps
              precise (time_faaaa, the fused mixes, time_mix_w1/w2 and time_decay_w1/w2); f16 for a matrix whose
              rows are not a multiple of Q8_0's block of 32

RWKV-6 in f16 gets the fp16 layer rescale (rescale_every_n_layers 6: att.output and ffn.value of block i divided by
2**(i // 6), which llama.cpp undoes by halving the residual every 6 blocks), as the reference package runs fp16,
so that backends that multiply in f16 stay in range; f32 and q8_0 get none (aviary.model.rescale.default_rescale).

Warned about: an RWKV-7 head size that is not a multiple of 64. llama.cpp's CPU WKV-7 kernel (llama-cpp-python
0.3.36) gives wrong logits for head size 32, from its own converter's file too, and right ones for 64 and 128;
every released RWKV-7 has 64.

Refused: RWKV-4/5 (llama.cpp runs RWKV-6 and RWKV-7 only), a vocabulary smaller than the World one, and a
state-tuned `time_state`: GGUF has no tensor for a starting state, and a file without it would be the base
model under the tuned one's name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from aviary.config import ConfigError, ModelConfig

__all__ = ["CHAT_TEMPLATE", "OUTTYPES", "GGUFError", "require_gguf", "write_gguf"]

OUTTYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {6: "RWKV6", 7: "RWKV7"}  # gguf.MODEL_ARCH members
CONTEXT_LENGTH = 1 << 20
LAYER_NORM_EPS = 1e-5
EOT_ID = 261  # "\n\n"

# The World chat format of aviary.chat_format (System: / User: / Assistant:, a blank line after each turn, blank
# lines inside a message folded: Jinja has no regex, so runs of up to four newlines). The comment names the format
# for llama.cpp's non-Jinja template detection.
CHAT_TEMPLATE = """\
{#- rwkv-world: the RWKV World chat format -#}
{%- for message in messages -%}
  {%- set content = message['content'] | replace('\\r\\n', '\\n') -%}
  {%- set content = content | replace('\\n\\n', '\\n') | replace('\\n\\n', '\\n') | trim -%}
  {%- if message['role'] == 'user' -%}
    {{- 'User: ' + content + '\\n\\n' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- 'Assistant: ' + content + '\\n\\n' -}}
  {%- else -%}
    {{- 'System: ' + content + '\\n\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- 'Assistant:' -}}
{%- endif -%}
"""

# Tensors llama.cpp keeps in f32 whatever the file type (its converter's list, for RWKV)
_KEEP_F32 = ("TIME_MIX_FIRST", "TIME_MIX_W1", "TIME_MIX_W2", "TIME_MIX_DECAY_W1", "TIME_MIX_DECAY_W2",
             "TIME_MIX_LERP_FUSED")


class GGUFError(ValueError):
    """A checkpoint llama.cpp cannot run, or the `gguf` package missing."""


def require_gguf():
    """The `gguf` package, or GGUFError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise GGUFError("writing GGUF needs the gguf package: pip install 'aviary[gguf]'") from None
    return gguf


# ---- tensors --------------------------------------------------------------------------------------------------

def _vector(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _t(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


# official name inside a block -> (GGUF tensor, transform), in the order they are written. Layer norms and ln_x
# have a weight and a bias, Linear layers a weight, the bare parameters neither.
_SHARED = [("ln1.weight", "ATTN_NORM", _keep), ("ln1.bias", "ATTN_NORM", _keep),
           ("ln2.weight", "ATTN_NORM_2", _keep), ("ln2.bias", "ATTN_NORM_2", _keep)]
_ATT_LINEAR = [("att.receptance.weight", "TIME_MIX_RECEPTANCE", _keep), ("att.key.weight", "TIME_MIX_KEY", _keep),
               ("att.value.weight", "TIME_MIX_VALUE", _keep), ("att.output.weight", "TIME_MIX_OUTPUT", _keep),
               ("att.ln_x.weight", "TIME_MIX_LN", _keep), ("att.ln_x.bias", "TIME_MIX_LN", _keep)]
_BLOCK = {
    6: [*_SHARED,
        ("att.time_maa_x", "TIME_MIX_LERP_X", _vector),
        ("att.time_maa_w1", "TIME_MIX_W1", _t),
        ("att.time_maa_w2", "TIME_MIX_W2", lambda t: t.permute(0, 2, 1)),  # [5, r, C] -> [5, C, r]
        ("att.time_decay", "TIME_MIX_DECAY", _vector),
        ("att.time_decay_w1", "TIME_MIX_DECAY_W1", _t),
        ("att.time_decay_w2", "TIME_MIX_DECAY_W2", _t),
        ("att.time_faaaa", "TIME_MIX_FIRST", _keep),  # [H, N]
        *_ATT_LINEAR,
        ("att.gate.weight", "TIME_MIX_GATE", _keep),
        ("ffn.time_maa_k", "CHANNEL_MIX_LERP_K", _vector),
        ("ffn.time_maa_r", "CHANNEL_MIX_LERP_R", _vector),
        ("ffn.key.weight", "CHANNEL_MIX_KEY", _keep),
        ("ffn.receptance.weight", "CHANNEL_MIX_RECEPTANCE", _keep),
        ("ffn.value.weight", "CHANNEL_MIX_VALUE", _keep)],
    7: [*_SHARED,
        *[(f"att.{x}{i}", f"TIME_MIX_{x.upper()}{i}", _vector if i == 0 else _t)
          for x in "wavg" for i in (0, 1, 2) if (x, i) != ("g", 0)],
        ("att.k_k", "TIME_MIX_K_K", _vector),
        ("att.k_a", "TIME_MIX_K_A", _vector),
        ("att.r_k", "TIME_MIX_R_K", _vector),  # [H, N] -> [C]
        *_ATT_LINEAR,
        ("ffn.x_k", "CHANNEL_MIX_LERP_K", _vector),
        ("ffn.key.weight", "CHANNEL_MIX_KEY", _keep),
        ("ffn.value.weight", "CHANNEL_MIX_VALUE", _keep)],
}
# the token-shift mixes that become one time_mix_lerp_fused [n, 1, 1, C], in llama.cpp's order
_FUSED = {6: ("att.time_maa_w", "att.time_maa_k", "att.time_maa_v", "att.time_maa_r", "att.time_maa_g"),
          7: ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g")}
_RESCALED = ("att.output.weight", "ffn.value.weight")  # RWKV-6's fp16 rescale divides these


def gguf_tensors(sd: Mapping[str, torch.Tensor], config: ModelConfig,
                 rescale_every: int = 0) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(gguf.MODEL_TENSOR member name, GGUF tensor name, tensor) for every tensor llama.cpp reads, transformed
    as its converter does, one at a time (so that converting a large model holds one tensor's copy at a time).
    `sd` may hold meta tensors: that gives the names and shapes without touching the data."""
    gguf = require_gguf()
    C = config.n_embd

    def name(kind: str, bid: int | None, leaf: str) -> str:
        base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid)
        return f"{base}.{'bias' if leaf.endswith('.bias') else 'weight'}"

    yield "TOKEN_EMBD", name("TOKEN_EMBD", None, ""), sd["emb.weight"]
    yield "TOKEN_EMBD_NORM", name("TOKEN_EMBD_NORM", None, ".weight"), sd["blocks.0.ln0.weight"]
    yield "TOKEN_EMBD_NORM", name("TOKEN_EMBD_NORM", None, ".bias"), sd["blocks.0.ln0.bias"]
    for i in range(config.n_layer):
        for leaf, kind, transform in _BLOCK[config.version]:
            if i == 0 and leaf in ("att.v0", "att.v1", "att.v2"):
                continue  # written as copies of a0/a1/a2, below
            t = transform(sd[f"blocks.{i}.{leaf}"])
            if rescale_every and leaf in _RESCALED:
                t = t.float() / 2 ** (i // rescale_every)
            yield kind, name(kind, i, leaf), t
            if i == 0 and leaf in ("att.a0", "att.a1", "att.a2"):
                yield f"TIME_MIX_V{leaf[-1]}", name(f"TIME_MIX_V{leaf[-1]}", i, leaf), t
            if leaf == "ln2.bias":  # the fused mixes follow the norms
                mixes = [sd[f"blocks.{i}.{m}"].reshape(1, 1, C) for m in _FUSED[config.version]]
                yield "TIME_MIX_LERP_FUSED", name("TIME_MIX_LERP_FUSED", i, ""), torch.stack(mixes)
    yield "OUTPUT_NORM", name("OUTPUT_NORM", None, ".weight"), sd["ln_out.weight"]
    yield "OUTPUT_NORM", name("OUTPUT_NORM", None, ".bias"), sd["ln_out.bias"]
    yield "OUTPUT", name("OUTPUT", None, ""), sd["head.weight"]


def tensor_type(kind: str, name: str, shape: tuple[int, ...], outtype: str):
    """The gguf.GGMLQuantizationType llama.cpp's converter gives a tensor in a file of `outtype`."""
    gguf = require_gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or not name.endswith(".weight") or kind in _KEEP_F32:
        return Q.F32
    wanted = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[outtype]
    if wanted == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:  # rows in whole blocks of 32, or f16
        return Q.F16
    return wanted


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


# ---- metadata and vocabulary ----------------------------------------------------------------------------------

def _escape(token: bytes) -> str:
    """A token as llama.cpp's RWKV vocabulary stores it: the text of Python's bytes repr, without b'' around it."""
    return repr(token)[2:-1]


def _add_vocab(writer, gguf, vocab_size: int) -> None:
    from aviary.tokenizer.world import WORLD_VOCAB, load_vocab

    vocab = load_vocab(WORLD_VOCAB)  # [id] -> bytes; [0] is end of document
    if len(vocab) > vocab_size:
        raise GGUFError(f"the model's embedding has {vocab_size:,} rows, fewer than the {len(vocab):,} ids of the "
                        "World vocabulary that llama.cpp's RWKV tokenizer reads")
    T = gguf.TokenType
    texts, types = ["<s>"], [T.CONTROL]
    for i in range(1, vocab_size):
        token = vocab[i] if i < len(vocab) else None
        texts.append(f"[PAD{i}]" if token is None else _escape(token))
        types.append(T.UNUSED if token is None else T.NORMAL)
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(texts)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_eot_token_id(EOT_ID)
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_metadata(writer, gguf, config: ModelConfig, outtype: str, rescale_every: int, name: str | None) -> None:
    F = gguf.LlamaFileType
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_wkv_head_size(config.head_size)
    if config.version == 6:
        writer.add_rescale_every_n_layers(rescale_every)
        writer.add_time_mix_extra_dim(config.rank_mix)
        writer.add_time_decay_extra_dim(config.rank_decay)
    else:
        writer.add_decay_lora_rank(config.rank_w)
        writer.add_iclr_lora_rank(config.rank_a)
        writer.add_value_residual_mix_lora_rank(config.rank_v)
        writer.add_gate_lora_rank(config.rank_g)
    writer.add_feed_forward_length(config.dim_ffn)
    writer.add_file_type({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0}[outtype])
    writer.add_head_count(0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- the file ------------------------------------------------------------------------------------------------

def check_for_llama_cpp(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The config of official-named `sd` if llama.cpp can run it as GGUF; else GGUFError saying why."""
    from aviary.loading import check_state_dict

    try:
        config = check_state_dict(sd)
    except ConfigError as e:
        raise GGUFError(str(e)) from None
    if config.version not in ARCHITECTURES:
        raise GGUFError(f"llama.cpp runs RWKV-6 and RWKV-7 only; this is an RWKV-{config.version} checkpoint")
    if any(k.endswith(".att.time_state") for k in sd):
        raise GGUFError("the checkpoint is state-tuned (blocks.N.att.time_state), and GGUF has no tensor for a "
                        "starting state: llama.cpp would run the base model. To convert the other weights "
                        "anyway, remove the time_state tensors first")
    if config.version == 7 and config.head_size % 64:
        warnings.warn(f"llama.cpp's CPU RWKV-7 kernel is wrong for head size {config.head_size} (right for 64 and "
                      "128): the file will load, but its logits will not be this model's", stacklevel=2)
    return config


def write_gguf(sd: Mapping[str, torch.Tensor], path: str | os.PathLike, outtype: str = "f16", *,
               name: str | None = None) -> dict[str, int]:
    """Write official-named RWKV-6 / RWKV-7 `sd` to `path` as a GGUF file llama.cpp loads (see the module
    docstring), through a temporary file renamed at the end. Returns {tensor type: number of tensors}.

    outtype: "f32", "f16" or "q8_0", the type of the matrices. name: general.name (e.g. the checkpoint's stem).
    Raises GGUFError for a model llama.cpp cannot run, OSError naming `path` when it cannot be written.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF type {outtype!r}; choose one of {OUTTYPES}")
    gguf = require_gguf()
    config = check_for_llama_cpp(sd)
    from aviary.model import VERSIONS
    from aviary.model.rescale import default_rescale

    rescale = default_rescale(VERSIONS[config.version], torch.float16 if outtype == "f16" else torch.float32)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.version])])
    _add_metadata(writer, gguf, config, outtype, rescale, name)
    _add_vocab(writer, gguf, config.vocab_size)

    counts: dict[str, int] = {}
    types = {}
    meta = {k: v.to("meta") for k, v in sd.items()}  # names, shapes and types first: the header precedes the data
    for kind, tname, t in gguf_tensors(meta, config, rescale):
        qtype = types[tname] = tensor_type(kind, tname, tuple(t.shape), outtype)
        writer.add_tensor_info(tname, tuple(t.shape), np.dtype(np.float32), _nbytes(gguf, tuple(t.shape), qtype),
                               raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tname, t in gguf_tensors(sd, config, rescale):
            data = t.detach().float().contiguous().numpy()
            writer.write_tensor_data(gguf.quants.quantize(data, types[tname]))
        writer.close()
        os.replace(tmp, path)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # name the file asked for, not the .tmp
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return counts
