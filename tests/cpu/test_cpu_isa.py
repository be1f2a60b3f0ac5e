"""The CPU backend's choices: the instruction set (AVIARY_CPU_ISA, aviary.cpu.use_isa), the decode path a
model records, and what `aviary info --system` and `aviary generate --stats` say about them."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import aviary
from aviary import cpu
from aviary.cpu import isa
from aviary.testing import random_config, save_random_checkpoint

C_ISAS = [name for name in cpu.runnable_isas() if name != "torch"]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.parametrize("name", [*C_ISAS, "torch"])
def test_the_environment_variable_picks_the_instruction_set_at_import(name):
    done = _python("from aviary import cpu; print(cpu.cpu_isa(), cpu.available(__import__('torch').float32))",
                   AVIARY_CPU_ISA=name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [name, str(name != "torch")]


def test_a_misspelt_instruction_set_is_an_error_that_names_the_choices():
    done = _python("import aviary.cpu", AVIARY_CPU_ISA="avx-2")
    assert done.returncode != 0
    assert "AVIARY_CPU_ISA='avx-2'" in done.stderr and "avx512, avx2, generic, torch" in done.stderr


def test_an_instruction_set_this_cpu_lacks_warns_and_takes_the_best(monkeypatch):
    """On a CPU without AVX-512, AVIARY_CPU_ISA=avx512 warns and runs the best it has (here simulated by
    a build that can run only the portable path)."""
    real = isa._kernels
    fake = types.SimpleNamespace(RUNNABLE=("generic",), BUILT=real.BUILT if real else (),
                                 use_isa=lambda name: "generic", isa=lambda: ("generic", 0))
    monkeypatch.setattr(isa, "_kernels", fake)
    monkeypatch.setenv("AVIARY_CPU_ISA", "avx512")
    try:
        with pytest.warns(RuntimeWarning, match="cannot run the 'avx512' kernels; it runs: generic, torch"):
            isa._choose_at_import()
        assert isa.cpu_isa() == "generic"
        with pytest.raises(ValueError, match="it runs: generic, torch"):
            cpu.use_isa("avx2")
    finally:
        monkeypatch.setattr(isa, "_kernels", real)
        cpu.use_isa(None)


def test_use_isa_switches_and_returns_the_previous_one():
    best = cpu.cpu_isa()
    try:
        for name in [*C_ISAS, "torch"]:
            before = cpu.use_isa(name)
            assert cpu.cpu_isa() == name and before in cpu.runnable_isas()
            assert cpu.available(torch.float32) == (name != "torch")
            assert cpu.MAX_ROWS[torch.float32] == (0 if name == "torch" else 64)
        with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
            cpu.use_isa("sse9")
    finally:
        cpu.use_isa(best)
    assert cpu.use_isa(None) == best and cpu.cpu_isa() == best == cpu.runnable_isas()[0]


def test_a_missing_extension_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(isa, "_kernels", None)
    monkeypatch.setattr(isa, "_IMPORT_ERROR", ImportError("No module named 'aviary._kernels'"))
    assert "No module named 'aviary._kernels'" in cpu.build_error()
    assert cpu.runnable_isas() == ("torch",)
    with pytest.raises(ValueError, match="aviary._kernels is missing"):
        cpu.use_isa("generic")


def test_the_model_records_its_decode_path_when_loaded_moved_and_quantised(tmp_path):
    path = tmp_path / "m.pth"
    save_random_checkpoint(path, random_config(6, n_layer=2, n_embd=128, vocab_size=300))
    model = aviary.load(path)
    first = model.decode_path
    assert first.device == "cpu" and first.isa == cpu.cpu_isa() and first.weights == ("float32",)
    n = first.products[1]
    assert first.products == ((n, n) if C_ISAS else (0, n))
    assert (first.blocks == "c") == bool(C_ISAS)
    model.bfloat16()
    assert model.decode_path.weights == ("bfloat16",)
    model.quantize("int8")
    assert model.decode_path.weights == ("int8",)
    text = str(model.decode_path)
    assert cpu.cpu_isa() in text and "threads" in text
    if C_ISAS:
        best = cpu.use_isa("torch")
        try:
            path = model.decode_path  # the process's instruction set changed: decided again
            assert path.isa == "torch" and path.blocks == "torch" and path.why == "the 'torch' instruction set"
            assert path.products[0] == 0
        finally:
            cpu.use_isa(best)
        model.head = torch.nn.Linear(128, 300, bias=False)
        model.blocks[1].att.key = torch.nn.Linear(128, 128, bias=False)
        assert model.decode_path.blocks == "torch" and "no C kernel" in model.decode_path.why


def test_info_system_and_generate_stats_say_what_runs(tmp_path, capsys):
    from aviary.cli import main

    assert main(["info", "--system", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["isa"] == cpu.cpu_isa() and info["runnable"] == list(cpu.runnable_isas())
    assert info["build_error"] is None or not C_ISAS
    assert main(["info", "--system"]) == 0
    assert "runnable here" in capsys.readouterr().out
    path = tmp_path / "m.pth"
    save_random_checkpoint(path, random_config(7, n_layer=1, n_embd=64, vocab_size=300))
    assert main(["info", str(path)]) == 0
    assert f"cpu decode  {'C kernels, ' + cpu.cpu_isa() if C_ISAS else 'torch'}" in capsys.readouterr().out
    assert main(["info"]) != 0 and "give a CHECKPOINT" in capsys.readouterr().err
