"""RWKV models: the shared shell (`rwkv.py`), one file per generation (`v4.py` ... `v7.py`, each ending with its
`SPEC`), and what they share (`common.py`). `VERSIONS` maps a version number to its `VersionSpec`."""

from aviary.model import v4, v5, v6, v7
from aviary.model.common import VersionSpec

VERSIONS: dict[int, VersionSpec] = {4: v4.SPEC, 5: v5.SPEC, 6: v6.SPEC, 7: v7.SPEC}

from aviary.model.rwkv import RWKV  # noqa: E402 - the shell reads VERSIONS

__all__ = ["RWKV", "VERSIONS", "VersionSpec"]
