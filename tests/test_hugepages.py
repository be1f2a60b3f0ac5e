"""aviary.hugepages: large CPU weights copied onto transparent huge pages, with nothing else changed."""

import gc

import pytest
import torch
import torch.nn as nn

import aviary
from aviary import hugepages
from aviary.hugepages import HUGE_PAGE, huge_copy, move_to_huge_pages
from aviary.io.checkpoint import read_state_dict, write_state_dict
from aviary.testing import random_config, save_random_checkpoint

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this system")


def _advised(t: torch.Tensor) -> bool:
    """Whether the memory map holding t's first byte carries the huge-page advice (VmFlags 'hg')."""
    addr = t.data_ptr()
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= addr < hi:
                flags = next(x for x in lines[i + 1:] if x.startswith("VmFlags"))
                return "hg" in flags.split()
    raise AssertionError("address not mapped")


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_huge_copy_is_an_aligned_advised_copy_that_outlives_its_map(dtype):
    src = (torch.randn(1000, 1100) * 50).to(dtype)  # 4.2 / 2.1 / 1.05 MiB: whole pages and a tail
    out = huge_copy(src)
    assert out.dtype == dtype and out.shape == src.shape and out.is_contiguous()
    assert torch.equal(out, src) and out.data_ptr() != src.data_ptr()
    assert out.data_ptr() % HUGE_PAGE == 0
    if src.nbytes >= HUGE_PAGE:
        assert _advised(out)
    expected = src.clone()
    del src
    gc.collect()
    assert torch.equal(out, expected)  # the map stays alive (and unchanged) with the tensor
    out.view(-1)[-1] = 7
    assert int(out.view(-1)[-1]) == 7


def test_huge_copy_refuses_other_devices():
    with pytest.raises(ValueError, match="CPU tensor"):
        huge_copy(torch.empty(4, device="meta"))


@needs_thp
def test_move_keeps_parameters_values_and_ties():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 768), nn.Linear(768, 1024, bias=False))
    net[0].register_buffer("big", torch.randn(600, 1024))
    tied = nn.Linear(768, 1024, bias=False)
    tied.weight = net[1].weight  # one Parameter in two modules
    small = nn.Linear(4, 4)
    model = nn.ModuleDict({"net": net, "tied": tied, "small": small})
    params = {n: p for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    x = torch.randn(3, 1024)
    y_before = net(x)
    moved = move_to_huge_pages(model)
    assert moved == net[0].weight.nbytes + net[0].big.nbytes  # the tied weight stays put
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert net[0].weight.data_ptr() % HUGE_PAGE == 0 and _advised(net[0].weight)
    assert tied.weight is net[1].weight
    assert torch.equal(net(x), y_before)
    loss = net(x).sum()
    loss.backward()  # still trainable
    assert net[0].weight.grad is not None


def test_move_does_nothing_without_huge_pages(monkeypatch):
    monkeypatch.setattr(hugepages, "available", lambda: False)
    lin = nn.Linear(1024, 1024)
    ptr = lin.weight.data_ptr()
    assert move_to_huge_pages(lin) == 0 and lin.weight.data_ptr() == ptr


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_load_on_huge_pages_gives_the_same_model(tmp_path, version):
    path = tmp_path / "m.pth"
    save_random_checkpoint(path, random_config(version, n_layer=2, n_embd=256, vocab_size=4096))
    plain = aviary.load(path, huge_pages=False)
    huge = aviary.load(path)
    tok = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        a, sa = plain(tok)
        b, sb = huge(tok)
        a1, _ = plain(tok[:, :1], sa)
        b1, _ = huge(tok[:, :1], sb)
    assert torch.equal(a, b) and torch.equal(a1, b1)
    if hugepages.available():
        assert huge.head.weight.data_ptr() % HUGE_PAGE == 0  # 4096 x 256 fp32: 4 MiB
    out = tmp_path / "again.safetensors"
    write_state_dict(huge.state_dict(), out)  # saving works (each tensor owns its storage)
    sd, _ = read_state_dict(out)
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())


@needs_thp
def test_move_leaves_views_that_claim_more_than_their_memory():
    # an expanded (stride-0) view claims 2 GiB of 4 KiB: copying it would allocate all of it
    lin = nn.Linear(1024, 1, bias=False)
    lin.weight = nn.Parameter(torch.randn(1, 1024).expand(2**19, 1024), requires_grad=False)
    ptr = lin.weight.data_ptr()
    assert move_to_huge_pages(lin) == 0 and lin.weight.data_ptr() == ptr
