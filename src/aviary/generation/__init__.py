"""Text generation: sampling settings, the batched prefill/decode engine, and the prefix-state cache."""

from aviary.generation.cache import StateCache
from aviary.generation.engine import Engine, GenerationError, SequenceOutput, generate, stream
from aviary.generation.sampling import SamplingParams

__all__ = ["Engine", "GenerationError", "SamplingParams", "SequenceOutput", "StateCache", "generate", "stream"]
