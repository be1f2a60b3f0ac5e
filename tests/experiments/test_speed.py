"""The speed/memory sweep: every op's inputs are valid, the slope and crossing arithmetic is right, and a smoke
run writes its files. Timings themselves are not tested (they depend on the machine)."""

import json
import math
from dataclasses import replace

import pytest
import torch

from aviary.experiments import speed
from aviary.experiments.speed import OPS, PRESETS, Row, crossings, make_inputs, slopes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("op", list(OPS))
def test_inputs_run_and_give_finite_output(op):
    B, T, D = 2, 37, 128  # T not a multiple of any chunk length: the padded path runs too
    fn, tensors = make_inputs(op, B, T, D)
    out = fn(**tensors)
    expected = {"rwkv4": (B, T, D), "attention": (B, D // 64, T, 64), "mamba": (B, T, 2 * D)}
    assert out.shape == expected.get(op, (B, T, D // 64, 64))
    assert torch.isfinite(out).all()
    if op in ("rwkv5", "rwkv6", "rwkv7"):
        assert (tensors["logw"] < 0).all()  # decays strictly inside (0, 1)


def test_rwkv7_inputs_are_the_models_delete_and_replace_vectors():
    _, t = make_inputs("rwkv7", 1, 8, 128)
    kk = -t["a"]
    assert torch.allclose(kk.norm(dim=-1), torch.ones(1, 8, 2))
    iclr = t["b"] / kk
    assert ((iclr > 0) & (iclr < 1)).all()


def test_fwdbwd_gives_every_input_a_gradient():
    fn, tensors = make_inputs("rwkv6", 1, 20, 128)
    for x in tensors.values():
        x.requires_grad_(True)
    fn(**tensors).sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in tensors.values())


def _rows(op, mode, exponent, lengths=(512, 1024, 2048, 4096, 8192, 16384), scale=1e-3):
    return [Row(op, mode, T, scale * T**exponent, 1.0) for T in lengths]


def test_slopes_recover_the_exponent_between_2k_and_16k():
    rows = _rows("lin", "fwd", 1.0) + _rows("quad", "fwd", 2.0, scale=1e-6)
    rows.append(Row("lin", "fwd", 32768, 1e9, 1.0))  # outside the range: ignored
    rows.append(Row("quad", "fwdbwd", 4096, math.nan, math.nan, note="skipped"))  # one point only: no slope
    s = slopes(rows)
    assert s[("lin", "fwd")] == pytest.approx(1.0)
    assert s[("quad", "fwd")] == pytest.approx(2.0)
    assert ("quad", "fwdbwd") not in s


def test_slopes_least_squares_through_noisy_points():
    rows = [Row("x", "fwd", T, ms, 0.0) for T, ms in ((2048, 10.0), (4096, 25.0), (8192, 40.0), (16384, 80.0))]
    xs = [math.log(T) for T in (2048, 4096, 8192, 16384)]
    ys = [math.log(v) for v in (10.0, 25.0, 40.0, 80.0)]
    mx, my = sum(xs) / 4, sum(ys) / 4
    expected = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    assert slopes(rows)[("x", "fwd")] == pytest.approx(expected)


def test_crossing_is_where_the_linear_op_stays_faster():
    rows = _rows("attention", "fwd", 2.0, scale=1e-6) + _rows("rwkv7", "fwd", 1.0, scale=1e-3)
    # 1e-3 T < 1e-6 T^2 from T > 1000: faster from 1024 on
    assert crossings(rows)[("rwkv7", "fwd")] == 1024
    rows = _rows("attention", "fwd", 2.0, scale=1e-9) + _rows("rwkv7", "fwd", 1.0, scale=1e-3)
    assert crossings(rows)[("rwkv7", "fwd")] is None


def test_smoke_preset_writes_csv_png_and_json(tmp_path):
    speed.main(["--preset", "smoke", "--out-dir", str(tmp_path), "--name", "s", "--threads", "1"])
    rows = speed.read_csv(tmp_path / "s.csv")
    preset = PRESETS["smoke"]
    assert len(rows) == len(preset.ops) * len(preset.modes) * len(preset.lengths)
    assert all(math.isfinite(r.median_ms) and r.median_ms > 0 for r in rows)
    assert (tmp_path / "s.png").stat().st_size > 10_000
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["preset"] == "smoke" and "faster_than_attention_from_T_cpu" in meta


def test_one_point_in_a_fresh_process_measures_memory():
    row = speed._measure_point("rwkv7", 32, "fwdbwd", replace(PRESETS["smoke"], isolate=True, width=128))
    assert row.note == "" and math.isfinite(row.median_ms)
    assert row.peak_mib > 0  # the backward's activations are at least a few hundred KiB


def test_decode_latency_plot_from_bench_inference_json(tmp_path):
    results = {"machine": {"threads": 2}, "context": {
        "contexts": [128, 1024], "ms": {"aviary fp32 RWKV-7": [25.0, 26.0], "GPT-2 (KV cache)": [50.0, 70.0]},
        "state_bytes": {"aviary fp32 RWKV-7": [2**21, 2**21], "GPT-2 (KV cache)": [2**23, 2**26]}}}
    src = tmp_path / "inference.json"
    src.write_text(json.dumps(results))
    speed.plot_decode_latency(src, tmp_path / "decode.png")
    assert (tmp_path / "decode.png").stat().st_size > 10_000


def test_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--help"])
    assert "smoke" in capsys.readouterr().out
