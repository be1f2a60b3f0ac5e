"""Time-mix operators, organised by the math rather than by model version.

    wkv4   RWKV-4: per-channel exponential decay with a normalising denominator
    gla    RWKV-5/6: gated linear attention with a bonus on the current token (v5 = constant decay)
    delta  RWKV-7: the generalised delta rule

Each op has a plain recurrent reference (`*_recurrent`, also the one-token decode path) and a
parallel form over a sequence (`*_chunked`), behind one function with an explicit `backend=`
argument. All of them compute in float32 and return `(output, final_state)`; none modifies its inputs.
"""

from aviary.ops.delta import delta_rule
from aviary.ops.gla import gla
from aviary.ops.wkv4 import wkv4

BACKENDS = ("recurrent", "chunked")

__all__ = ["BACKENDS", "delta_rule", "gla", "wkv4"]
