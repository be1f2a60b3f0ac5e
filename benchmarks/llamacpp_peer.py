"""llama.cpp as an optional peer of bench_inference.py: the same checkpoint, converted to GGUF, decoded by
llama.cpp through its Python binding (`pip install llama-cpp-python`, which builds llama.cpp from source:
about 16 minutes on 2 cores; `CMAKE_ARGS="-DGGML_NATIVE=ON"` is its default, a build for this CPU).

The conversion path (in f32 its logits equal Aviary's to rounding, so the comparison is of the same model;
docs/benchmarks.md, Design measurements item 10):

    aviary convert model.pth folder/                  # Hugging Face / fla layout (RWKV-6 / RWKV-7)
    cp rwkv_vocab_v20230424.txt folder/               # the World vocabulary, shipped in aviary/tokenizer/data
    python convert_hf_to_gguf.py folder/ --outtype f32|q8_0 --outfile model-f32.gguf

convert_hf_to_gguf.py and its gguf-py are not in the installed wheel: they are in the llama-cpp-python sdist,
under vendor/llama.cpp. `source_tree()` uses a given llama.cpp tree (or unpacked sdist), else fetches the sdist
of the installed version with pip into a cache and unpacks those files only, so the converter matches the
library. The converter imports torch, numpy, transformers (AutoConfig) and requests besides its own gguf-py.

Everything that can fail raises `Unavailable` with a reason, so the benchmark can skip the peer and go on.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSIONS = (6, 7)  # RWKV versions llama.cpp runs (RWKV6 / RWKV7 architectures; no RWKV-4/5)
OUTTYPES = ("f32", "q8_0")
VOCAB = "rwkv_vocab_v20230424.txt"
CONVERTER = "convert_hf_to_gguf.py"
# the files of the sdist's vendor/llama.cpp that the converter needs
_MEMBERS = (CONVERTER, "conversion/", "gguf-py/", "models/templates/llama-cpp-rwkv-world.jinja")


class Unavailable(RuntimeError):
    """llama.cpp cannot be a peer here; the message says why."""


def missing() -> str | None:
    """Why llama.cpp cannot run here (None when it can, as far as imports go)."""
    for module, package in (("llama_cpp", "llama-cpp-python"), ("transformers", "transformers")):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            use = "" if module == "llama_cpp" else " (convert_hf_to_gguf.py imports it)"
            return f"No module named '{module}'{use}: pip install {package}"
    return None


def library_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aviary" / "llama.cpp"


def _tree(path: Path) -> Path | None:
    for cand in (path, path / "vendor" / "llama.cpp"):
        if (cand / CONVERTER).is_file() and (cand / "gguf-py" / "gguf").is_dir():
            return cand
    return None


def source_tree(src: str | os.PathLike | None = None, cache: Path | None = None, timeout: float = 900) -> Path:
    """A folder with convert_hf_to_gguf.py, conversion/ and gguf-py/: `src` (a llama.cpp tree or an unpacked
    llama-cpp-python sdist), else the cached copy for the installed llama-cpp-python, else that version's sdist
    fetched with `pip download` and those files unpacked into the cache."""
    if src is not None:
        tree = _tree(Path(src))
        if tree is None:
            raise Unavailable(f"{src}: no {CONVERTER} with gguf-py/ in it (nor in vendor/llama.cpp/)")
        return tree
    version = library_version()
    dest = (cache or cache_root()) / f"llama-cpp-python-{version}"
    tree = _tree(dest)
    if tree is not None:
        return tree
    print(f"  llama.cpp: fetching the llama-cpp-python {version} sdist for {CONVERTER} (pip download)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"llama-cpp-python=={version}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"pip download of the llama-cpp-python {version} sdist took over {timeout:.0f} s; "
                              "pass --llama-cpp-src") from None
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
            raise Unavailable(f"pip download llama-cpp-python=={version} failed ({tail}); pass --llama-cpp-src")
        unpack(archives[0], dest)
    tree = _tree(dest)
    if tree is None:
        raise Unavailable(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp/{CONVERTER}")
    return tree


def unpack(archive: Path, dest: Path) -> None:
    """Unpack the converter's files of an sdist's vendor/llama.cpp/ into dest (whole, or not at all)."""
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            top, _, rest = m.name.partition("/")
            if not rest.startswith("vendor/llama.cpp/") or not (m.isfile() or m.isdir()):
                continue
            rel = rest.removeprefix("vendor/llama.cpp/")
            if any(rel == want or (want.endswith("/") and rel.startswith(want)) for want in _MEMBERS):
                m.name = rel
                members.append(m)
        tar.extractall(part, members=members, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    part.rename(dest)


def vocab_path() -> Path:
    import aviary

    return Path(aviary.__file__).parent / "tokenizer" / "data" / VOCAB


def _run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 1800) -> None:
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{' '.join(cmd[:3])}... took over {timeout:.0f} s (log: {log})") from None
    if proc.returncode != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        raise Unavailable(f"{Path(cmd[1]).name if cmd[1] != '-m' else cmd[2]} failed: "
                          f"{lines[-1] if lines else proc.returncode} (log: {log})")


def convert(pth: str | os.PathLike, folder: str | os.PathLike, tree: Path,
            outtypes: tuple[str, ...] = OUTTYPES) -> dict[str, Path]:
    """GGUF files of the checkpoint `pth`, one per outtype, in `folder` (re-used when already there):
    `aviary convert` to the Hugging Face / fla layout, the World vocabulary beside it, then the sdist's
    convert_hf_to_gguf.py with its own gguf-py. Returns {outtype: path}."""
    folder = Path(folder)
    out = {t: folder / f"model-{t}.gguf" for t in outtypes}
    todo = [t for t, p in out.items() if not p.is_file()]
    if not todo:
        return out
    hf = folder / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if not (hf / "config.json").is_file() or not (hf / "model.safetensors").is_file():
            _run([sys.executable, "-m", "aviary", "convert", str(pth), str(hf), "--force"],
                 folder / "aviary-convert.log")
        shutil.copyfile(vocab_path(), hf / VOCAB)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(tree / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])]))
        env.pop("NO_LOCAL_GGUF", None)
        for t in todo:
            part = out[t].with_name(out[t].name + ".part")
            _run([sys.executable, str(tree / CONVERTER), str(hf), "--outtype", t, "--outfile", str(part)],
                 folder / f"convert-{t}.log", env=env)
            part.rename(out[t])
    finally:
        if all(p.is_file() for p in out.values()):  # the safetensors copy is only a step on the way
            shutil.rmtree(hf, ignore_errors=True)
    return out


class LlamaCppEngine:
    """One llama.cpp context on a GGUF file: `step(tokens [1, T], state)` evaluates the tokens after the
    stream so far (a fresh stream when state is None) and returns (logits of the last one [1, V], state),
    like bench_inference's other engines. The state lives in the context; the returned one is a marker."""

    def __init__(self, gguf: str, threads: int, n_ctx: int = 8192, n_batch: int = 32):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=n_batch, n_ubatch=n_batch, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.gguf = str(gguf)

    def step(self, tokens, state):
        import numpy as np
        import torch

        if state is None:
            self.llm.reset()  # n_tokens = 0 and the recurrent state cleared
        ids = tokens[0].tolist()
        if self.llm.n_tokens + len(ids) > self.llm.n_ctx():
            raise RuntimeError(f"llama.cpp context of {self.llm.n_ctx()} tokens is full")
        self.llm.eval(ids)
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        return torch.from_numpy(logits.copy())[None], True

    def info(self) -> dict:
        system = self.lib.llama_print_system_info()
        return {"llama_cpp_python": library_version(), "gguf": Path(self.gguf).name,
                "gguf_bytes": os.path.getsize(self.gguf), "n_vocab": self.n_vocab,
                "threads": self.llm.context_params.n_threads,
                "system_info": system.decode() if isinstance(system, bytes) else str(system)}
