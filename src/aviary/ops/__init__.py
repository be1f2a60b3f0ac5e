"""Time-mix operators, organised by the math rather than by model version.

    wkv4   RWKV-4: per-channel exponential decay with a normalising denominator
    gla    RWKV-5/6: gated linear attention with a bonus on the current token (v5 = constant decay)
    delta  RWKV-7: the generalised delta rule

Each op has a plain recurrent reference (`*_recurrent`, also the one-token decode path) and a
parallel form over a sequence (`*_chunked`), behind one function with an explicit `backend=`
argument. All of them compute in float32 and return `(output, final_state)`; none modifies its inputs.
Optional GPU backends sit in the same tables: "fla" (flash-linear-attention's kernels, `aviary.ops.fla`) for
gla and delta_rule. `backends_of(op)` lists an op's names; a model accepts those of its time-mix's op.
"""

from aviary.ops.delta import BACKENDS as _DELTA_BACKENDS
from aviary.ops.delta import delta_rule
from aviary.ops.gla import BACKENDS as _GLA_BACKENDS
from aviary.ops.gla import gla
from aviary.ops.wkv4 import BACKENDS as _WKV4_BACKENDS
from aviary.ops.wkv4 import wkv4

BACKENDS = ("recurrent", "chunked")  # the backends every op has

# op name (a version's `TimeMix.op`) -> its backend table, the live dict each op dispatches with
OP_BACKENDS = {"wkv4": _WKV4_BACKENDS, "gla": _GLA_BACKENDS, "delta_rule": _DELTA_BACKENDS}


def backends_of(op: str) -> tuple[str, ...]:
    """The backend names `op` has, e.g. backends_of("gla") -> ("recurrent", "chunked", "fla")."""
    return tuple(OP_BACKENDS[op])


__all__ = ["BACKENDS", "OP_BACKENDS", "backends_of", "delta_rule", "gla", "wkv4"]
