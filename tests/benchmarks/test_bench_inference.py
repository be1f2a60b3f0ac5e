"""benchmarks/bench_inference.py: its plumbing, not its timings. Missing peers are skipped with a reason and
the rest goes on; AVIARY_CPU_ISA reaches the Aviary workers; the JSON carries backend_info and each worker's
decode path. The small end-to-end run uses a 1-layer model, so no number here means anything."""

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from aviary import cpu
from aviary.testing import random_config, save_random_checkpoint

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench_inference")


@pytest.fixture(autouse=True)
def no_forced_isa(monkeypatch):
    """The tests set AVIARY_CPU_ISA themselves where they need it (the benchmark reads it as its default)."""
    monkeypatch.delenv("AVIARY_CPU_ISA", raising=False)


@pytest.fixture(scope="module")
def peer():
    return _load("llamacpp_peer")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-layer RWKV-7 with the full vocabulary (the workers draw token ids below 65536)."""
    path = tmp_path_factory.mktemp("bench") / "tiny.pth"
    save_random_checkpoint(path, random_config(7, n_layer=1, n_embd=64, head_size=32, vocab_size=65536))
    return str(path)


def _args(bench, argv=(), best="avx512"):
    args = bench.parse_args(list(argv))
    args.best_isa = best
    return args


# ---- peers ------------------------------------------------------------------------------------------------

def test_a_missing_module_is_a_skipped_peer_with_a_reason(bench, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rwkv", None)  # what importlib sees for a module that cannot be imported
    reason = bench.missing_peer("rwkv")
    assert reason and "rwkv" in reason
    monkeypatch.setitem(bench.PEER_MODULES, "transformers", ("no_such_module_for_aviary_tests", "x"))
    assert "no_such_module_for_aviary_tests" in bench.missing_peer("transformers")
    skipped = {}
    bench.skip(skipped, "rwkv", reason)
    bench.skip(skipped, "rwkv", "said twice")
    assert skipped == {"rwkv": reason}
    assert capsys.readouterr().out.count("skipped rwkv: ") == 1


def test_specs_leave_skipped_peers_out(bench, monkeypatch):
    monkeypatch.delenv("AVIARY_CPU_ISA", raising=False)
    args = _args(bench, ["--no-llama-cpp"])
    with_pip = bench.engine_specs(6, "m.pth", args, {})
    assert {"pip cpu fp32", "pip cpu bf16", "pip cpu fp32i8"} <= set(with_pip)
    without = bench.engine_specs(6, "m.pth", args, {"rwkv": "No module named 'rwkv'"})
    assert not [k for k in without if k.startswith("pip")]
    assert {"aviary fp32", "aviary bf16", "aviary int8", bench.TORCH_ONLY} <= set(without)
    assert "pip cpu fp32i8" not in bench.engine_specs(7, "m.pth", args, {})  # the pip package has no v7 int8


def test_llama_cpp_is_skipped_when_missing_or_declined(bench, monkeypatch, tmp_path, capsys):
    args = _args(bench)
    monkeypatch.setattr(bench.llamacpp_peer, "missing", lambda: "No module named 'llama_cpp'")
    skipped = {}
    assert bench.prepare_llama(7, "m.pth", tmp_path, args, skipped) == {}
    assert skipped == {"llama.cpp": "No module named 'llama_cpp'"}
    assert "skipped llama.cpp: No module named 'llama_cpp'" in capsys.readouterr().out
    monkeypatch.setattr(bench.llamacpp_peer, "missing", lambda: None)
    skipped = {}
    assert bench.prepare_llama(5, "m.pth", tmp_path, args, skipped) == {}  # llama.cpp has no RWKV-5
    assert list(skipped) == ["llama.cpp RWKV-5"]
    skipped = {}
    assert bench.prepare_llama(7, "m.pth", tmp_path, _args(bench, ["--no-llama-cpp"]), skipped) == {}
    assert skipped == {"llama.cpp": "--no-llama-cpp"}
    monkeypatch.setattr(bench.llamacpp_peer, "source_tree", lambda src: (_ for _ in ()).throw(
        bench.llamacpp_peer.Unavailable("pip download failed")))
    skipped = {}
    assert bench.prepare_llama(7, "m.pth", tmp_path, args, skipped) == {}
    assert skipped == {"llama.cpp": "pip download failed"}
    ggufs = {"f32": tmp_path / "a.gguf", "q8_0": tmp_path / "b.gguf"}
    specs = bench.engine_specs(7, "m.pth", args, {}, ggufs)
    assert specs["llama.cpp f32"] == {"kind": "llama.cpp", "gguf": str(ggufs["f32"]), "version": 7,
                                      "omp_wait_policy": None}
    # llama.cpp runs without OMP_WAIT_POLICY (ggml's per-op OpenMP barriers sleep under PASSIVE), the rest with it
    env = bench.worker_env(specs["llama.cpp q8_0"], base={"OMP_WAIT_POLICY": "PASSIVE"})
    assert "OMP_WAIT_POLICY" not in env and env["OMP_NUM_THREADS"] == "2"
    assert bench.worker_env(specs["aviary fp32"])["OMP_WAIT_POLICY"] == bench.OMP_WAIT_POLICY
    specs = bench.engine_specs(7, "m.pth", _args(bench, ["--llama-omp-wait-policy", "active"]), {}, ggufs)
    assert bench.worker_env(specs["llama.cpp f32"])["OMP_WAIT_POLICY"] == "ACTIVE"
    assert bench.decode_only("llama.cpp q8_0") and bench.decode_only("aviary fp32 generic")
    assert not bench.decode_only("aviary fp32") and not bench.decode_only("aviary int8")


class _Fake:
    def __init__(self, peer, fail_at=None):
        self.peer, self.failed, self.fail_at, self.calls = peer, None, fail_at, 0

    def ask(self, **task):
        self.calls += 1
        if self.calls == self.fail_at:
            raise _Fake.error("worker died")
        return {"times": [0.01 * self.calls]}


def test_a_peer_failing_mid_run_is_dropped_an_aviary_engine_failing_stops(bench):
    _Fake.error = bench.WorkerFailed
    workers = {"aviary fp32": _Fake(None), "pip cpu fp32": _Fake("rwkv", fail_at=2)}
    skipped = {}
    out = bench.rounds(workers, {"task": "decode"}, 3, lambda r: r["times"][0], skipped)
    assert list(out) == ["aviary fp32"] and len(out["aviary fp32"]) == 3
    assert workers["pip cpu fp32"].failed and "pip cpu fp32" in skipped
    assert list(bench.live(workers)) == ["aviary fp32"]
    with pytest.raises(bench.WorkerFailed):
        bench.rounds({"aviary fp32": _Fake(None, fail_at=1)}, {"task": "decode"}, 1, lambda r: r, {})


# ---- the instruction set ----------------------------------------------------------------------------------

def test_isa_reaches_every_aviary_worker_and_only_them(bench, monkeypatch):
    monkeypatch.delenv("AVIARY_CPU_ISA", raising=False)
    args = _args(bench, ["--isa", "AVX2"])
    assert args.isa == "avx2"
    specs = bench.engine_specs(7, "m.pth", args, {})
    env = {k: bench.worker_env(s, base={"AVIARY_CPU_ISA": "avx512", "PATH": "/bin"}) for k, s in specs.items()}
    for k in ("aviary fp32", "aviary bf16", "aviary int8"):
        assert env[k]["AVIARY_CPU_ISA"] == "avx2", k
    assert env["aviary fp32 generic"]["AVIARY_CPU_ISA"] == "generic"  # the extra engine (--extra-isas)
    assert env[bench.TORCH_ONLY]["AVIARY_CPU_ISA"] == "torch"
    assert env["pip cpu fp32"]["RWKV_V7_ON"] == "1" and env["pip cpu fp32"]["OMP_NUM_THREADS"] == "2"
    # no --isa and none in the environment: the Aviary workers run the best (the variable is removed)
    args = _args(bench, [])
    assert args.isa is None
    spec = bench.engine_specs(7, "m.pth", args, {})["aviary fp32"]
    assert "AVIARY_CPU_ISA" not in bench.worker_env(spec, base={"AVIARY_CPU_ISA": "generic"})
    monkeypatch.setenv("AVIARY_CPU_ISA", "generic")  # the environment's choice is the default
    assert bench.parse_args([]).isa == "generic"
    with pytest.raises(SystemExit):
        bench.parse_args(["--isa", "sse9"])


def test_extra_isas(bench):
    assert bench.extra_isas(_args(bench, [])) == ["generic"]
    assert bench.extra_isas(_args(bench, ["--isa", "generic"])) == []  # the main engines run it already
    assert bench.extra_isas(_args(bench, ["--extra-isas", "avx2,generic,torch"], best="avx2")) == ["generic"]
    assert bench.extra_isas(_args(bench, ["--extra-isas", ""])) == []
    specs = bench.engine_specs(7, "m.pth", _args(bench, ["--engines", "aviary int8, pip cpu fp32"]), {})
    assert list(specs) == ["aviary fp32", "aviary int8", "pip cpu fp32"]
    assert bench.isa_engine("generic") == "aviary fp32 generic" and bench.isa_engine("torch") == bench.TORCH_ONLY


# ---- what the JSON and the table carry --------------------------------------------------------------------

@pytest.mark.skipif("generic" not in cpu.runnable_isas(), reason="aviary._kernels is not built")
def test_workers_report_their_decode_path_and_a_failing_peer_is_skipped(bench, tiny, tmp_path):
    specs = {"aviary fp32": {"kind": "aviary", "path": tiny, "dtype": "float32", "isa": "generic"},
             "llama.cpp f32": {"kind": "llama.cpp", "gguf": str(tmp_path / "missing.gguf"), "version": 7}}
    skipped = {}
    workers = bench.start_workers(specs, skipped)
    try:
        assert list(workers) == ["aviary fp32"]  # llama.cpp failed to load (not installed, or no such file)
        assert "llama.cpp f32" in skipped
        info = workers["aviary fp32"].info
        assert info["forced_isa"] == "generic" and info["isa"] == "generic"
        path = info["decode_path"]
        assert path["isa"] == "generic" and path["device"] == "cpu" and path["threads"] == bench.THREADS
        assert "generic" in path["summary"]
        r = workers["aviary fp32"].ask(task="decode", n=1)
        assert len(r["times"]) == 1
        with pytest.raises(bench.WorkerFailed, match="unknown task"):
            workers["aviary fp32"].ask(task="no such task")
        workers["aviary fp32"].ask(task="decode", n=1)  # an error answer leaves the worker serving
    finally:
        bench.close_all(workers)


def test_a_decode_only_run_writes_json_with_backend_and_decode_paths(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "L", 1)  # the checkpoints the parent writes: 1 layer, width 64
    monkeypatch.setattr(bench, "D", 64)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 10.0)
    monkeypatch.setitem(bench.PEER_MODULES, "rwkv", ("no_such_module_for_aviary_tests", "rwkv"))
    import aviary.testing  # main imports random_config from it when it runs

    def small(v, n_layer, n_embd, vocab_size):
        return random_config(v, n_layer=n_layer, n_embd=n_embd, head_size=32, vocab_size=vocab_size)

    monkeypatch.setattr(aviary.testing, "random_config", small)
    monkeypatch.setenv("AVIARY_CPU_ISA", "")  # main sets it (--isa): restored after the test
    monkeypatch.delenv("AVIARY_CPU_ISA")
    before = cpu.cpu_isa()
    out = tmp_path / "r.json"
    try:
        bench.main(["--tasks", "decode", "--versions", "7", "--rounds", "1", "--steps", "1", "--no-llama-cpp",
                    "--engines", f"aviary int8,{bench.TORCH_ONLY}", "--isa", "generic", "--workdir", str(tmp_path),
                    "--json", str(out)])
    finally:
        cpu.use_isa(before)
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["backend"]["isa"] == "generic" and r["backend"]["forced"] == "generic"
    assert r["isa"]["forced"] == "generic"
    assert set(r["skipped"]) == {"rwkv", "llama.cpp"}
    v7 = r["rwkv7"]
    assert set(v7["decode_ms"]) == {"aviary fp32", "aviary int8", bench.TORCH_ONLY}  # --engines, and fp32
    assert "decode_ratio_vs_pip_fp32" not in v7  # no pip package: no ratio to it
    for k in ("aviary fp32", "aviary int8"):
        assert v7["engines"][k]["decode_path"]["isa"] == "generic"
        assert v7["engines"][k]["forced_isa"] == "generic"
    assert v7["engines"][bench.TORCH_ONLY]["decode_path"]["isa"] == "torch"
    assert "skipped rwkv: " in text
    assert v7["engines"]["aviary fp32"]["decode_path"]["summary"] in text  # the table shows each decode path


def test_table_without_peers_and_with_llama_cpp(bench):
    e = {"max_abs": 1e-4, "rms": 1e-5, "rel_rms": 1e-6, "top1_agree": 1.0, "logit_rms": 1.0, "n_positions": 8,
         "first_max_abs": 1e-5, "first_rel_rms": 1e-6}
    path = {"summary": "cpu avx2, one C call for all blocks, 73/73 products in C (float32), 2 threads"}
    results = {"args": {"prefill": 64, "batch": 16, "error_tokens": 8}, "copy_bandwidth_gbs": 20.0,
               "backend": {"cpu": "X", "runnable": ["avx2", "generic", "torch"]},
               "isa": {"workers": "avx2"}, "skipped": {"rwkv": "No module named 'rwkv'"},
               "rwkv7": {"info": {"weight_bytes": 10**8}, "info_bf16": {"weight_bytes": 5 * 10**7},
                         "info_int8": {"weight_bytes": 3 * 10**7},
                         "engines": {"aviary fp32": {"decode_path": path, "forced_isa": "avx2"}},
                         "decode_ms": {"aviary fp32": 20.0, "aviary int8": 10.0, "llama.cpp f32": 30.0},
                         "decode_ratio_vs_llamacpp": {"aviary fp32": 1.5},
                         "llamacpp_check": {"llama.cpp f32 vs aviary fp32": e},
                         "prefill_s": {"aviary fp32": 0.5}, "prefill_ratio_vs_pip": {},
                         "error_vs_own_fp32": {"aviary fp32": e, "aviary int8": e},
                         "llamacpp_vs_aviary": {"llama.cpp f32 vs aviary fp32": e}}}
    text = bench.table(results)
    assert "skipped rwkv: No module named 'rwkv'" in text
    assert path["summary"] in text and "| aviary fp32 | avx2 |" in text
    assert "| aviary fp32 | 20.0 | 50.0 | – | – |" in text  # no pip: no ratio
    assert "| llama.cpp f32 | 30.0 | aviary fp32 | 20.0 | 1.50 | 1.0e-04 |" in text
    assert "| aviary fp32 | 0.50 | 128 | – |" in text
    assert "| aviary int8 | 0.000 |" in text and "| llama.cpp f32 vs aviary fp32 | 1.00e-04 |" in text


def test_a_note_when_llama_cpp_runs_instructions_aviary_is_kept_from(bench):
    avx512 = SimpleNamespace(peer="llama.cpp", info={"system_info": "CPU : AVX2 = 1 | AVX512 = 1 | "})
    avx2 = SimpleNamespace(peer="llama.cpp", info={"system_info": "CPU : AVX2 = 1 | FMA = 1 | "})
    aviary = SimpleNamespace(peer=None, info={})
    assert "GGML_NATIVE=OFF" in bench.llama_isa_note({"a": aviary, "l": avx512}, "avx2")
    assert bench.llama_isa_note({"a": aviary, "l": avx512}, "avx512") is None
    assert bench.llama_isa_note({"a": aviary, "l": avx2}, "avx2") is None


# ---- llama.cpp's converter from the sdist -----------------------------------------------------------------

def test_unpack_takes_only_the_converter_files(peer, tmp_path):
    archive = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/gguf-py/gguf/__init__.py",
                     "vendor/llama.cpp/conversion/rwkv.py", "vendor/llama.cpp/src/llama.cpp", "llama_cpp/llama.py"):
            data = b"# " + name.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-0.0.1/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "tree"
    peer.unpack(archive, dest)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["conversion/rwkv.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert peer.source_tree(dest) == dest
    with pytest.raises(peer.Unavailable, match="no convert_hf_to_gguf.py"):
        peer.source_tree(tmp_path / "nowhere")
    assert peer.vocab_path().is_file()  # the World vocabulary the converter needs, shipped with Aviary


def test_parse_args_quick(bench, monkeypatch):
    monkeypatch.delenv("AVIARY_CPU_ISA", raising=False)
    args = bench.parse_args(["--quick"])
    assert (args.rounds, args.steps, args.prefill, args.error_tokens) == (2, 2, 64, 8)
    json.dumps(vars(args))  # plain data: it goes into the JSON as is
