"""`PeftConfig`: which parameter-efficient method, and its sizes. Plain data; importing it imports no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["DEFAULT_TARGETS", "METHODS", "MISS_MODES", "PeftConfig"]

METHODS = ("lora", "pissa", "miss", "state")
MISS_MODES = ("bone", "bat")
# RWKV-PEFT's `make_linear_att` / `make_linear_ffn`: the time-mix r, k, v, o and the channel-mix k, v
DEFAULT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


@dataclass(frozen=True)
class PeftConfig:
    """method:  lora | pissa | miss | state (aviary.peft's docstring has the equations);
    rank:       r of LoRA, PiSSA and MiSS;
    alpha:      LoRA's scale is alpha / rank (PiSSA and MiSS have none);
    dropout:    LoRA's dropout on the adapter's input;
    targets:    the products adapted, as paths inside a block ("att.key", "ffn.value");
    parts:      substrings of parameter names also trained in full (RWKV-PEFT's `train_parts`: "ln", "time",
                "emb", "head"); never the frozen weight under an adapter;
    miss_mode:  bone (one [r, out] matrix on the input summed over blocks of r channels) or bat (a block-affine
                map of W itself, [in/r, r, r]);
    pissa_niter: subspace iterations of PiSSA's randomised SVD."""

    method: str
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    parts: tuple[str, ...] = ()
    miss_mode: str = "bone"
    pissa_niter: int = 4

    def __post_init__(self) -> None:
        # lists from JSON/YAML become tuples, so that configs compare and hash alike
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "parts", tuple(self.parts))

    def validate(self) -> PeftConfig:
        """Raise ValueError naming the bad field; returns self."""
        if self.method not in METHODS:
            raise ValueError(f"unknown fine-tuning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method != "state":
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"peft rank must be a positive integer, got {self.rank!r}")
            if not self.targets:
                raise ValueError(f"{self.method} needs at least one target (e.g. {DEFAULT_TARGETS[1]!r})")
            bad = [t for t in self.targets if not isinstance(t, str) or not t or t.startswith(".") or t.endswith(".")]
            if bad:
                raise ValueError(f"peft targets are module paths inside a block such as 'att.key'; got {bad}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout and self.method != "lora":
            raise ValueError(f"dropout is LoRA's; {self.method} has none (got dropout={self.dropout})")
        if self.miss_mode not in MISS_MODES:
            raise ValueError(f"unknown MiSS mode {self.miss_mode!r}; choose one of {', '.join(MISS_MODES)}")
        if not isinstance(self.pissa_niter, int) or self.pissa_niter < 0:
            raise ValueError(f"pissa_niter must be a non-negative integer, got {self.pissa_niter!r}")
        bad = [p for p in self.parts if not isinstance(p, str) or not p]
        if bad:
            raise ValueError(f"parts are non-empty substrings of parameter names ('ln', 'time', 'emb', 'head'); "
                             f"got {bad}")
        return self

    @property
    def scale(self) -> float:
        """The factor on the adapter's product: alpha / rank for LoRA, 1 for PiSSA (and unused otherwise)."""
        return self.alpha / self.rank if self.method == "lora" else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"], d["parts"] = list(self.targets), list(self.parts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PeftConfig:
        """The inverse of `to_dict`; unknown keys are an error (a typo would otherwise be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown peft setting(s) {unknown}; known: {sorted(known)}")
        if "method" not in d:
            raise ValueError("a peft config needs a 'method' (" + " | ".join(METHODS) + ")")
        return cls(**d)
