"""Model weights on transparent huge pages (Linux), for CPU decoding.

A CPU decode step reads every weight of the model once per token. With ordinary 4 KiB pages that is one
TLB entry per 4 KiB: an L12-D768 model touches ~140,000 pages per token, and on a virtual machine every
TLB miss is a two-level page walk. 2 MiB pages cut that 512-fold, which makes single-stream decode
measurably faster (docs/benchmarks.md, Inference item 8 and Design measurements item 8).

`move_to_huge_pages(model)` copies each large CPU tensor of a module (parameters and buffers of at least
`min_bytes`) into its own anonymous memory map, asks the kernel for huge pages on the whole 2 MiB pages
inside it (`madvise(MADV_HUGEPAGE)`, which works whenever /sys/kernel/mm/transparent_hugepage/enabled is
"always" or "madvise"), and points the tensor at it (`tensor.data = ...`, so parameters stay the same
objects). The tail of a tensor past its last whole huge page stays on small pages, so no memory is
wasted beyond the untouched alignment gap. `aviary.load` does this for CPU models unless told not to.

Nothing changes in what the tensors hold; weights loaded memory-mapped from an fp32 `.pth` become
private copies (the file's pages were shared page cache before).
"""

from __future__ import annotations

import mmap

import torch
import torch.nn as nn

HUGE_PAGE = 2 << 20  # x86-64 transparent huge pages

__all__ = ["HUGE_PAGE", "available", "huge_copy", "move_to_huge_pages"]


def available() -> bool:
    """Whether this system takes huge-page advice for anonymous memory (Linux with THP not "never")."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` whose whole 2 MiB pages are advised as huge pages."""
    if t.device.type != "cpu":
        raise ValueError(f"huge_copy: a CPU tensor is needed, got one on {t.device}")
    nbytes = t.numel() * t.element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` open as long as a view lives
    start = -raw.data_ptr() % HUGE_PAGE  # the first 2 MiB boundary (a multiple of the 4 KiB page size)
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if whole:
        region.madvise(mmap.MADV_HUGEPAGE, start, whole)  # before the first touch: faults take huge pages
    out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def move_to_huge_pages(module: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move `module`'s CPU parameters and buffers of at least `min_bytes` onto huge pages (see the module
    docstring) and copy the smaller ones, so that none of them still lives in a memory-mapped checkpoint
    (the file would stay mapped for a few small tensors). Returns the bytes moved to huge pages; where the
    system has no transparent huge pages, does nothing and returns 0. Tensors that share storage with
    another one (tied weights, views) are left as they are, so ties survive, and so are views that claim
    more elements than their memory holds (a stride-0 `expand`): copying one would allocate all of them."""
    if not available():
        return 0
    tensors = [t for m in module.modules() for t in (*m._parameters.values(), *m._buffers.values())
               if t is not None]
    owners: dict[int, int] = {}
    for t in tensors:
        if t.device.type == "cpu":
            key = t.untyped_storage().data_ptr()
            owners[key] = owners.get(key, 0) + 1
    moved = 0
    for t in tensors:  # a tensor listed twice (one Parameter in two modules) counts as shared: skipped
        nbytes = t.numel() * t.element_size()
        if (t.device.type != "cpu" or owners[t.untyped_storage().data_ptr()] > 1
                or t.untyped_storage().nbytes() < nbytes):
            continue
        with torch.no_grad():
            if nbytes >= min_bytes and t.is_contiguous():
                t.data = huge_copy(t.detach())
                moved += nbytes
            else:  # small: a plain copy, so that nothing keeps a memory-mapped checkpoint file mapped
                t.data = t.detach().clone()
    return moved
