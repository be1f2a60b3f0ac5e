"""Training configuration: plain dataclasses, read from YAML or TOML, every field overridable on the
command line as `--section.field VALUE`; `aviary train --help` is generated from the field docs here.

    model:  what to train (sizes, or a checkpoint to continue from)
    peft:   fine-tune an adapter (LoRA, PiSSA, MiSS) or the initial state instead of every weight
    data:   binidx datasets and the context length
    optim:  AdamW, learning-rate schedule, L2Wrap, clipping (reference sections 8.2-8.4)
    train:  batch, accumulation, length of the run, chunked ("infctx") samples, precision, parallelism
    out:    run directory, logging, validation, checkpoints, export
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "ConfigError", "load_config", "add_config_arguments", "config_from_args"]


class ConfigError(ValueError):
    """A training configuration that cannot run; raised before any compute."""


def _f(default: Any, doc: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class ModelSection:
    version: int = _f(7, "RWKV generation", (4, 5, 6, 7))
    n_layer: int = _f(6, "number of blocks")
    n_embd: int = _f(128, "model width C")
    head_size: int = _f(64, "channels per head (v5-v7)")
    dim_ffn: int = _f(0, "channel-mix width; 0 = the version's default (4C, or int(3.5C)//32*32 for v5/v6)")
    vocab_size: int = _f(65536, "vocabulary size (65536 for the World tokenizer)")
    rank_w: int = _f(0, "v7 decay LoRA rank; 0 = RWKV-LM's default for this width (as every rank_*)")
    rank_a: int = _f(0, "v7 in-context learning rate LoRA rank")
    rank_v: int = _f(0, "v7 value-residual LoRA rank")
    rank_g: int = _f(0, "v7 gate LoRA rank")
    rank_mix: int = _f(0, "v6 token-shift mix LoRA rank")
    rank_decay: int = _f(0, "v6 decay LoRA rank")
    load: str = _f("", "start from this checkpoint's weights (fine-tuning); its sizes override the ones above")
    compact_vocab: bool = _f(False, "train only the emb/head rows of ids found in data.train, the other ids "
                                    "sharing one row (exact; exports have the full vocabulary)")


PEFT_METHODS = ("none", "lora", "pissa", "miss", "state")


@dataclass
class PeftSection:
    method: str = _f("none", "none (train every weight), lora, pissa, miss (adapters on the targets below), or "
                             "state (only each layer's initial WKV state, RWKV-5/6/7); needs model.load",
                     PEFT_METHODS)
    rank: int = _f(32, "adapter rank r (lora, pissa, miss)")
    alpha: float = _f(32.0, "LoRA scale: the update is (alpha / rank) B A (lora only)")
    dropout: float = _f(0.0, "dropout on the adapter's input (lora)")
    targets: str = _f("att.receptance,att.key,att.value,att.output,ffn.key,ffn.value",
                      "comma list of the linears that get an adapter (time-mix r, k, v, o and channel-mix k, v)")
    parts: str = _f("", "comma list of name parts whose parameters are also trained (ln, time, emb, head)")
    miss_mode: str = _f("bone", "MiSS variant", ("bone", "bat"))
    pissa_niter: int = _f(4, "subspace iterations of PiSSA's truncated SVD")

    def peft_config(self):
        """The `aviary.peft.PeftConfig` of this section (None for method none)."""
        if self.method == "none":
            return None
        from aviary.peft import PeftConfig

        return PeftConfig(method=self.method, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          targets=comma_list(self.targets), parts=comma_list(self.parts), miss_mode=self.miss_mode,
                          pissa_niter=self.pissa_niter)


def comma_list(text: str) -> tuple[str, ...]:
    """"a, b,c" -> ("a", "b", "c")."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


@dataclass
class DataSection:
    train: str = _f("", "training data: binidx prefix (NAME for NAME.bin + NAME.idx)")
    valid: str = _f("", "held-out binidx prefix for validation loss (optional)")
    ctx_len: int = _f(512, "tokens per sample (a multiple of 16)")


@dataclass
class OptimSection:
    lr_init: float = _f(6e-4, "peak learning rate")
    lr_final: float = _f(6e-5, "learning rate at the end of the schedule")
    warmup_steps: int = _f(10, "steps of warmup: lr *= 0.01 + 0.99 * step / warmup_steps")
    schedule: str = _f("cosine", "decay after warmup", ("cosine", "exponential", "constant"))
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.99, "Adam beta2")
    adam_eps: float = _f(1e-18, "Adam epsilon")
    weight_decay: float = _f(0.001, "AdamW decay, on large matrices only")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = off")
    l2wrap: float = _f(1e-4, "L2Wrap factor on the largest logit; 0 = off")


@dataclass
class TrainSection:
    micro_bsz: int = _f(8, "sequences per forward pass per process")
    accumulate: int = _f(1, "micro-batches per optimizer step (global batch = micro_bsz * accumulate * world)")
    max_steps: int = _f(0, "optimizer steps to run; 0 = derive from max_tokens or epochs")
    max_tokens: int = _f(0, "stop after this many training tokens (when max_steps is 0)")
    epochs: float = _f(1.0, "passes over the data (when max_steps and max_tokens are 0)")
    precision: str = _f("fp32", "fp32, or bf16 autocast (weights and optimizer stay fp32)", ("fp32", "bf16"))
    grad_cp: bool = _f(False, "gradient checkpointing: recompute each block in the backward pass")
    seed: int = _f(0, "seed for the initial weights and the sample order")
    threads: int = _f(0, "CPU threads for torch; 0 = torch's default")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    strategy: str = _f("ddp", "multi-process: ddp, or fsdp for models that do not fit one device",
                       ("ddp", "fsdp"))
    chunk_len: int = _f(0, "run each sample in chunks of this many tokens, carrying the recurrent state from "
                           "chunk to chunk (\"infctx\"); divides data.ctx_len, a multiple of 16; 0 = off")
    backend: str = _f("chunked", "time-mix backend (aviary.ops.backends_of): chunked (exact PyTorch, any device), "
                                 "recurrent (the reference loop, slow), fla (RWKV-5/6/7) or triton, the GPU ones "
                                 "(CUDA, pip install aviary[gpu]); a version takes only its time-mix op's backends "
                                 "(RWKV-4 has no fla)")
    chunk_mode: str = _f("full", "truncated: the state is detached between chunks; full: exact gradients through "
                                 "the state, each chunk recomputed in the backward pass",
                         ("truncated", "full"))


@dataclass
class OutSection:
    dir: str = _f("runs/default", "run directory: checkpoints, log.jsonl, loss.png, exports")
    log_every: int = _f(10, "steps between log.jsonl lines")
    val_every: int = _f(0, "steps between validation losses; 0 = only at the end (a fine-tuning run, model.load, also "
                                    "validates before its first step)")
    val_samples: int = _f(64, "held-out windows per validation (leave data.valid empty for no validation)")
    save_every: int = _f(100, "steps between checkpoints")
    keep_last: int = _f(2, "checkpoints to keep")
    tensorboard: bool = _f(False, "also write TensorBoard events to DIR/tb")
    export: str = _f("safetensors,pth", "formats written to DIR/model.* at the end (comma list; '' = none)")
    export_dtype: str = _f("bf16", "dtype of the exported weights", ("fp32", "bf16", "fp16"))
    progress: bool = _f(True, "show a progress bar")


def rank_fields(version: int) -> tuple[str, ...]:
    """The LoRA ranks (`rank_w`, ...) a new model of this version has, and a training config may set."""
    from aviary.model import VERSIONS  # torch: only when a config is checked, never for --help

    spec = VERSIONS.get(version)  # an unknown version is reported by validate's choices check
    return tuple(k for k in spec.default_sizes(64) if k.startswith("rank_")) if spec else ()


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
SECTIONS = {"model": ModelSection, "peft": PeftSection, "data": DataSection, "optim": OptimSection,
            "train": TrainSection, "out": OutSection}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    peft: PeftSection = field(default_factory=PeftSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    out: OutSection = field(default_factory=OutSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        cfg = cls()
        for section, values in d.items():
            if section not in SECTIONS:
                raise ConfigError(f"{source}: unknown section {section!r}; sections are {sorted(SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {section!r} must be a mapping")
            for key, value in values.items():
                set_field(cfg, f"{section}.{key}", value, source)
        return cfg

    def validate(self) -> None:
        """Every check that can fail before compute: sizes, choices, data files present."""
        m, d, o, t = self.model, self.data, self.optim, self.train
        problems = []
        for section in SECTIONS:
            for f in fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                choices = f.metadata.get("choices")
                if choices and value not in choices:
                    problems.append(f"{section}.{f.name}={value!r} is not one of {list(choices)}")
                if isinstance(value, float) and not math.isfinite(value):  # inf/NaN slip past every < and >
                    problems.append(f"{section}.{f.name}={value} must be a finite number")
        if not m.load:
            for name in ("n_layer", "n_embd", "head_size", "vocab_size"):
                if getattr(m, name) <= 0:
                    problems.append(f"model.{name} must be positive")
            has = rank_fields(m.version)
            for name in (f.name for f in fields(m) if f.name.startswith("rank_")):
                if getattr(m, name) < 0 or (getattr(m, name) and name not in has):
                    problems.append(f"model.{name}={getattr(m, name)}: must be >= 0, and set only for a version with "
                                    f"that LoRA (RWKV-{m.version} has {', '.join(has) or 'none'})")
            if m.version != 4 and m.head_size > 0 and m.n_embd % m.head_size:
                problems.append(f"model.n_embd={m.n_embd} is not a multiple of model.head_size={m.head_size}")
        elif m.compact_vocab:
            problems.append("model.compact_vocab cannot be combined with model.load (fine-tuning)")
        elif not Path(m.load).exists():
            problems.append(f"model.load: no such checkpoint {m.load}")
        if d.ctx_len <= 0 or d.ctx_len % 16:
            problems.append(f"data.ctx_len={d.ctx_len} must be a positive multiple of 16")
        if t.chunk_len < 0 or (t.chunk_len and (t.chunk_len % 16 or d.ctx_len % t.chunk_len)):
            problems.append(f"train.chunk_len={t.chunk_len} must be 0 (off) or a multiple of 16 that divides "
                            f"data.ctx_len={d.ctx_len}")
        problems += self._peft_problems()
        if t.micro_bsz <= 0 or t.accumulate <= 0:
            problems.append("train.micro_bsz and train.accumulate must be positive")
        if o.lr_init <= 0 or o.lr_final < 0:
            problems.append("optim.lr_init must be positive and optim.lr_final non-negative")
        if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
            problems.append("optim.beta1 and optim.beta2 must be in [0, 1)")
        if min(o.weight_decay, o.grad_clip, o.l2wrap, o.warmup_steps, o.adam_eps) < 0:
            problems.append("optim.weight_decay, grad_clip, l2wrap, warmup_steps and adam_eps must be >= 0")
        if t.max_steps < 0 or t.max_tokens < 0 or t.epochs <= 0:
            problems.append("train.max_steps and max_tokens must be >= 0 and train.epochs positive")
        if t.threads < 0:
            problems.append(f"train.threads={t.threads} must be >= 0 (0 = torch's default)")
        if not 0 <= t.seed < 2**63:
            problems.append("train.seed must be in [0, 2**63)")
        problems += _backend_problems(m, t)
        if not DEVICE.fullmatch(t.device):
            problems.append(f"train.device={t.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if self.out.save_every <= 0 or self.out.keep_last <= 0 or self.out.log_every <= 0:
            problems.append("out.save_every, out.keep_last and out.log_every must be positive")
        if self.out.val_samples <= 0:  # 0 windows would report a validation loss of 0
            problems.append("out.val_samples must be positive (leave data.valid empty for no validation)")
        if self.out.val_every < 0:
            problems.append("out.val_every must be >= 0 (0 = only at the end)")
        if not d.train:
            problems.append("data.train is not set (a binidx prefix made by `aviary data prepare`)")
        for name in ("train", "valid"):
            prefix = getattr(d, name)
            if prefix:
                from aviary.train.data import binidx_paths

                missing = [str(p) for p in binidx_paths(prefix) if not p.is_file()]
                if missing:
                    problems.append(f"data.{name}: missing {', '.join(missing)} (run `aviary data prepare`)")
        bad_formats = {x for x in self.out.export.split(",") if x} - {"pth", "safetensors"}
        if bad_formats:
            problems.append(f"out.export: unknown formats {sorted(bad_formats)} (pth, safetensors)")
        if problems:
            raise ConfigError("bad training config: " + "; ".join(problems))

    def _peft_problems(self) -> list[str]:
        p, problems = self.peft, []
        if p.method == "none" or p.method not in PEFT_METHODS:  # an unknown method: the choices check said so
            return problems
        if not self.model.load:
            problems.append(f"peft.method={p.method} fine-tunes a trained model: set model.load to its checkpoint")
        if self.train.strategy == "fsdp":
            problems.append(f"peft.method={p.method} does not run under train.strategy fsdp (an adapter is small: "
                            "use ddp)")
        if p.method == "state" and not comma_list(p.parts) and self.train.chunk_len and \
                self.train.chunk_mode == "truncated":
            problems.append("peft.method=state with train.chunk_mode=truncated: only the first chunk would see the "
                            "tuned start state; use train.chunk_mode full")
        try:  # the sizes and names, by the adapter package's own rules
            p.peft_config().validate()
        except ValueError as e:
            problems.append(f"peft: {e}")
        return problems


def _backend_problems(m: ModelSection, t: TrainSection) -> list[str]:
    """train.backend against the version's time-mix op (a loaded checkpoint's version is checked when it is read),
    and the GPU backends' needs: a CUDA device and the package (fla; triton, whose interpreter also runs on a CPU)."""
    from aviary.model import VERSIONS
    from aviary.ops import backends_of

    problems = []
    spec = VERSIONS.get(m.version)
    if not m.load and spec is not None and t.backend not in backends_of(spec.time_mix.op):
        problems.append(f"train.backend={t.backend!r}: RWKV-{m.version} has no {t.backend!r} backend; choose one of "
                        f"{', '.join(backends_of(spec.time_mix.op))}")
    if t.backend == "fla":
        import importlib.util

        import torch

        from aviary.ops.fla import INSTALL

        if t.device in ("cpu", "mps") or (t.device == "auto" and not torch.cuda.is_available()):
            problems.append(f"train.backend=fla runs on CUDA only, not train.device={t.device}"
                            + (" (no CUDA device here)" if t.device == "auto" else ""))
        if importlib.util.find_spec("fla") is None:
            problems.append(f"train.backend=fla needs flash-linear-attention's kernels: {INSTALL}")
    if t.backend == "triton":
        import importlib.util
        import os

        import torch

        from aviary.ops.triton import INSTALL

        # Triton's interpreter (its own environment variable) runs the kernels on CPU tensors: the tests use it
        on_cpu = t.device in ("cpu", "mps") or (t.device == "auto" and not torch.cuda.is_available())
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            problems.append(f"train.backend=triton runs on CUDA, not train.device={t.device}"
                            + (" (no CUDA device here)" if t.device == "auto" else "")
                            + "; on a CPU only under Triton's interpreter (TRITON_INTERPRET=1), which is for tests")
        if importlib.util.find_spec("triton") is None:
            problems.append(f"train.backend=triton needs Triton: {INSTALL}")
    return problems


def _convert(value: Any, typ: type, name: str) -> Any:
    if isinstance(value, str) and typ is not str:
        if typ is bool:
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ConfigError(f"{name}: expected true/false, got {value!r}")
            return low in ("1", "true", "yes", "on")
        try:
            return typ(value)
        except ValueError:
            if typ is int:  # 1e6 is an int too; 1e400 (inf), nan and 2.5 are not
                with contextlib.suppress(ValueError):
                    number = float(value)
                    if number.is_integer():
                        return int(number)
            raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}")
    return value


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def set_field(cfg: TrainConfig, dotted: str, value: Any, source: str = "config") -> None:
    section, _, key = dotted.partition(".")
    sec = getattr(cfg, section, None) if section in SECTIONS else None
    names = {f.name: f for f in fields(SECTIONS[section])} if sec is not None else {}
    if key not in names:
        raise ConfigError(f"{source}: unknown option {dotted!r}")
    f = names[key]
    setattr(sec, key, _convert(value, _TYPES[str(f.type)], dotted))


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a TrainConfig (unset fields keep defaults)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a YAML or TOML text file (not UTF-8 at byte {e.start})") from None
    if p.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: {e}") from None
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{p}: reading YAML needs PyYAML (pip install pyyaml), or use TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: {e}") from None
    else:
        raise ConfigError(f"{p}: config must be .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections")
    return TrainConfig.from_dict(data, source=str(p))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--section.field` option per config field, with its doc and default as help."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} (config section [{section}])")
        for f in fields(cls):
            default = f.default
            choices = f.metadata.get("choices")
            extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
            group.add_argument(f"--{section}.{f.name}", dest=f"cfg__{section}__{f.name}", default=None,
                               metavar=str(f.type).upper(), help=f"{f.metadata['doc']}{extra} [{default!r}]")


def config_from_args(args: argparse.Namespace, path: str | None) -> TrainConfig:
    cfg = load_config(path) if path else TrainConfig()
    for name, value in vars(args).items():
        if name.startswith("cfg__") and value is not None:
            _, section, key = name.split("__", 2)
            set_field(cfg, f"{section}.{key}", value, source="command line")
    return cfg
