"""`aviary info` and `aviary convert`, through the command-line entry point."""

import json
import re

import pytest
import torch

import aviary
from aviary.cli import main
from aviary.io import read_state_dict
from aviary.testing import random_config, save_random_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    """A state-tuned RWKV-6 checkpoint with 3 heads (width 192) and a vocabulary of 500."""
    path = tmp_path / "rwkv6.pth"
    save_random_checkpoint(path, random_config(6, n_layer=3, n_embd=192, vocab_size=500), time_state=True)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_text(capsys, ckpt):
    code, out, _ = run(capsys, "info", ckpt)
    assert code == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.strip().splitlines())
    assert rows["version"] == 'RWKV-6 "Finch"'
    assert rows["layout"] == "official"
    assert rows["layers"] == "3" and rows["width"] == "192" and rows["vocab"] == "500"
    assert rows["heads"] == "3 x head size 64"
    assert rows["LoRA ranks"] == "mix 32, decay 64"
    assert rows["time_state"].startswith("yes")
    assert "float32" in rows["dtypes"]


def test_info_json_agrees_with_the_model(capsys, ckpt):
    code, out, _ = run(capsys, "info", "--json", ckpt)
    assert code == 0
    info = json.loads(out)
    model = aviary.load(ckpt)
    assert info["version"] == 6 and info["layout"] == "official"
    assert info["config"] == model.config.to_dict()
    assert info["parameters"] == model.num_parameters  # time_state is not a parameter
    assert info["state_bytes"] == model.init_state(batch_size=1).nbytes
    assert info["dtypes"] == {"float32": len(read_state_dict(ckpt)[0])}
    assert info["time_state"] is True


def test_convert_to_a_folder_and_back(capsys, tmp_path, ckpt):
    code, out, _ = run(capsys, "convert", ckpt, tmp_path / "hf6")
    assert code == 0 and "hf-rwkv6" in out
    assert json.loads((tmp_path / "hf6" / "config.json").read_text())["model_type"] == "rwkv6"
    code, _, _ = run(capsys, "convert", tmp_path / "hf6", tmp_path / "back.safetensors")
    assert code == 0
    original, _ = read_state_dict(ckpt)
    back, layout = read_state_dict(tmp_path / "back.safetensors")
    assert layout == "official" and back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_convert_dtype_and_layout(capsys, tmp_path):
    save_random_checkpoint(tmp_path / "v7.pth", random_config(7))
    code, _, _ = run(capsys, "convert", tmp_path / "v7.pth", tmp_path / "v7-fla.safetensors",
                     "--layout", "fla-rwkv7", "--dtype", "bfloat16")
    assert code == 0
    code, out, _ = run(capsys, "info", "--json", tmp_path / "v7-fla.safetensors")
    info = json.loads(out)
    assert info["layout"] == "fla-rwkv7" and set(info["dtypes"]) == {"bfloat16"}


def test_convert_refuses_to_overwrite(capsys, tmp_path, ckpt):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    code, _, err = run(capsys, "convert", ckpt, target)
    assert code == 2 and "--force" in err and target.read_bytes() == b"precious"
    code, _, _ = run(capsys, "convert", ckpt, target, "--force")
    assert code == 0 and read_state_dict(target)[1] == "official"


def test_convert_refuses_a_layout_that_cannot_hold_the_model(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "x", "--layout", "hf-rwkv4")
    assert code == 2 and "hf-rwkv4 holds RWKV-4 only" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("verb", ["info", "convert"])
def test_bad_file_is_one_line_and_exit_code_2(capsys, tmp_path, verb):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    args = [verb, bad] + ([tmp_path / "out.pth"] if verb == "convert" else [])
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "error" in err


def _last_line_of_python(code: str) -> str:
    """Run `code` in a fresh interpreter (nothing imported yet) and return the last line it printed."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_command_sets_the_openmp_wait_policy_before_torch_loads():
    # OpenMP reads OMP_WAIT_POLICY once, when torch loads it: `import aviary` must not import torch, so
    # that `aviary ...` (and `python -m aviary`) can set PASSIVE first
    code = ("import os, sys\n"
            "os.environ.pop('OMP_WAIT_POLICY', None)\n"
            "import aviary, aviary.cli\n"
            "assert 'torch' not in sys.modules, 'import aviary loaded torch'\n"
            "try:\n"
            "    aviary.cli.main(['info', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\n")
    assert _last_line_of_python(code) == "PASSIVE"


def test_help_does_not_load_torch():
    # `aviary --help` and every verb's --help build the whole parser: they should not wait for torch
    code = ("import sys, aviary.cli\n"
            "for argv in (['--help'], ['train', '--help'], ['convert', '--help'], ['generate', '--help']):\n"
            "    try:\n"
            "        aviary.cli.main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules)\n")
    assert _last_line_of_python(code) == "False"


def test_convert_layout_choices_are_the_known_layouts():
    from aviary.commands import convert
    from aviary.io import names

    assert convert.LAYOUTS == names.LAYOUTS


def test_lazy_train_package():
    import aviary.train as t
    from aviary.train.loop import train

    assert t.train is train and set(t.__all__) == set(t._WHERE)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        t.nope  # noqa: B018


def test_lazy_package_attributes():
    import aviary

    assert aviary.load is aviary.loading.load and aviary.RWKV.__name__ == "RWKV"
    assert set(aviary.__all__) == set(aviary._EXPORTS) and set(aviary.__all__) <= set(dir(aviary))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        aviary.nope  # noqa: B018
