"""The one place that turns a `backend=` name into a function."""

from collections.abc import Callable, Mapping


def pick(op: str, backends: Mapping[str, Callable], backend: str) -> Callable:
    try:
        return backends[backend]
    except KeyError:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {sorted(backends)}") from None

