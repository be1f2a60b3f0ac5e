"""How much bf16 and int8 change a trained model's predictions: logit error, KL divergence and held-out
loss against fp32, in the decode path (one token at a time, the C kernels) and the prefill path (chunks
through the parallel form).

    python benchmarks/bench_precision.py                          # the bundled aviary-v7-tiny, 2048 tokens
    python benchmarks/bench_precision.py --model RWKV-x070-World-0.1B-...pth --tokens 4096

The text is held-out English (`../shared/data/corpus/valid.jsonl.xz`, or any `--text` file of JSON lines
with a "text" field, or plain text): the first `--segment` tokens of evenly spaced documents, each segment
from a fresh state, until `--tokens` tokens. Every engine sees the same tokens. Aviary's fp32 / bf16 / int8
run in this process; the `rwkv` pip package (`cpu fp32`, `cpu bf16`, and `cpu fp32i8` for RWKV-4/5/6) runs in
worker processes of bench_inference.py when it is installed (`--no-pip` skips it). Each engine is compared
with its own implementation's fp32 on the same path. Writes JSON (benchmarks/results/precision.json), with
`aviary.cpu.backend_info()` ("backend") and each Aviary model's decode path ("decode_path"); AVIARY_CPU_ISA
picks the instruction set of the C kernels.

Random-weight checkpoints (what bench_inference.py uses) exaggerate every precision's error, because a random
deep network amplifies perturbations; this benchmark is for trained checkpoints.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import backend_info, decode_path  # noqa: E402

from aviary.eval.precision import compare_logits as compare  # noqa: E402  (the measurement `aviary eval compare` makes)
from aviary.eval.precision import segment_targets as _targets  # noqa: E402
from aviary.eval.precision import token_segments as _token_segments  # noqa: E402

DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "corpus" / "valid.jsonl.xz"


def read_documents(path: Path) -> list[str]:
    """Documents of a .jsonl(.xz) file with a "text" field, or one plain-text file as one document."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    docs = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()] if ".jsonl" in path.name else [raw]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SystemExit(f"{path}: no text in it")
    return docs


def token_segments(docs: list[str], tokenizer, n_tokens: int, segment: int) -> list[list[int]]:
    """aviary.eval.precision.token_segments, with a shortage of text as this script's exit message."""
    try:
        return _token_segments(docs, tokenizer, n_tokens, segment)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def decode_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] float32, one token at a time through the recurrent form (the path generation takes)."""
    state, out = None, []
    with torch.inference_mode():
        for t in ids:
            logits, state = model(torch.tensor([[t]]), state, last_only=True, inplace=state is not None)
            out.append(logits[0, -1].float())
    return torch.stack(out)


def prefill_logits(model, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits [T, V] float32 through the parallel form, `chunk` tokens per call, the state carried."""
    state, out = None, []
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            logits, state = model(torch.tensor([ids[i:i + chunk]]), state)
            out.append(logits[0].float())
    return torch.cat(out)


def aviary_logits(model, segments, chunk: int) -> dict[str, torch.Tensor]:
    return {"decode": torch.cat([decode_logits(model, ids) for ids in segments]),
            "prefill": torch.cat([prefill_logits(model, ids, chunk) for ids in segments])}


def pip_logits(pth: str, strategy: str, version: int, segments, tmp: str) -> torch.Tensor:
    from bench_inference import Worker, pip_env

    w = Worker(strategy, {"kind": "pip", "path": pth, "strategy": strategy, "version": version}, pip_env(version))
    try:
        w.ready()
        out = []
        for i, ids in enumerate(segments):
            p = w.ask(task="logits", tokens=ids, out=os.path.join(tmp, f"pip-{strategy.replace(' ', '_')}-{i}.pt"))
            out.append(torch.load(p["path"], weights_only=True))
            os.remove(p["path"])
    finally:
        w.close()
    return torch.cat(out)


def pip_available() -> bool:
    try:
        import rwkv  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the bundled aviary-v7-tiny)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="held-out text: .jsonl(.xz) or plain text")
    ap.add_argument("--tokens", type=int, default=2048, help="positions compared (default 2048)")
    ap.add_argument("--segment", type=int, default=256, help="tokens per document segment (default 256)")
    ap.add_argument("--chunk", type=int, default=128, help="prefill tokens per call (default 128)")
    ap.add_argument("--no-pip", action="store_true", help="skip the rwkv pip package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "precision.json")
    args = ap.parse_args()
    for name in ("tokens", "segment", "chunk", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if not args.text.exists():
        ap.error(f"--text {args.text} does not exist (the default is the shared held-out corpus)")

    import aviary
    from aviary.io.checkpoint import read_state_dict, write_state_dict
    from aviary.models import default_model_path

    torch.set_num_threads(args.threads)
    path = args.model or str(default_model_path())
    fp32 = aviary.load(path, dtype="float32")
    config = fp32.config
    tokenizer = aviary.load_tokenizer(version=config.version)
    segments = token_segments(read_documents(args.text), tokenizer, args.tokens, args.segment)
    targets = _targets(segments)
    print(f"{Path(path).name}: RWKV-{config.version}, {config.n_layer} layers, width {config.n_embd}; "
          f"{targets.numel()} positions in {len(segments)} segments of {args.text.name}", flush=True)

    t0 = time.perf_counter()
    results: dict = {"model": Path(path).name, "version": config.version, "text": args.text.name,
                     "positions": int(targets.numel()), "segments": len(segments), "chunk": args.chunk,
                     "backend": backend_info(), "decode_path": {"fp32": decode_path(fp32)}, "aviary": {}, "pip": {}}
    print(f"  decode path fp32: {results['decode_path']['fp32']['summary']}", flush=True)
    ref = aviary_logits(fp32, segments, args.chunk)
    del fp32
    for name, dtype, quant in (("bf16", "bfloat16", None), ("int8", "float32", "int8")):
        model = aviary.load(path, dtype=dtype, quantize=quant)
        results["decode_path"][name] = decode_path(model)
        print(f"  decode path {name}: {results['decode_path'][name]['summary']}", flush=True)
        logits = aviary_logits(model, segments, args.chunk)
        del model
        results["aviary"][name] = {p: compare(logits[p], ref[p], targets) for p in ("decode", "prefill")}
        print(f"  aviary {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results["aviary"]["fp32 decode vs prefill"] = compare(ref["decode"], ref["prefill"], targets)

    if not args.no_pip and pip_available():
        with tempfile.TemporaryDirectory() as tmp:
            pth = path
            if not path.endswith(".pth"):  # the pip package reads .pth files only
                pth = os.path.join(tmp, "model.pth")
                write_state_dict(read_state_dict(path)[0], pth)
            strategies = ["cpu fp32", "cpu bf16"] + ([] if config.version == 7 else ["cpu fp32i8"])
            pip = {s: pip_logits(pth, s, config.version, segments, tmp) for s in strategies}
        for s in strategies[1:]:
            results["pip"][s] = compare(pip[s], pip["cpu fp32"], targets)
        results["aviary fp32 vs pip fp32"] = compare(ref["decode"], pip["cpu fp32"], targets)
        print(f"  pip ({time.perf_counter() - t0:.0f} s)", flush=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\nwrote {args.json}")


def markdown(r: dict) -> str:
    lines = [f"**{r['model']}** (RWKV-{r['version']}), {r['positions']} positions of {r['text']} in "
             f"{r['segments']} segments; each engine against its own fp32 on the same path:", "",
             "| engine | path | loss (nats) | Δ loss | KL mean | KL max | top-1 agree | logit RMS err | max abs |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(engine: str, path: str, e: dict) -> str:
        return (f"| {engine} | {path} | {e['loss']:.4f} | {e['loss'] - e['loss_ref']:+.4f} | {e['kl_mean']:.1e} | "
                f"{e['kl_max']:.1e} | {100 * e['top1_agree']:.1f} % | {100 * e['rel_rms']:.2f} % | "
                f"{e['max_abs']:.3f} |")

    fp32 = r["aviary"]["bf16"]["decode"]
    lines.append(f"| aviary fp32 | decode | {fp32['loss_ref']:.4f} | | | | | | |")
    for name in ("bf16", "int8"):
        for path in ("decode", "prefill"):
            lines.append(row(f"aviary {name}", path, r["aviary"][name][path]))
    lines.append(row("aviary fp32", "decode vs prefill", r["aviary"]["fp32 decode vs prefill"]))
    if r["pip"]:
        ref = r["aviary fp32 vs pip fp32"]
        lines.append(f"| pip cpu fp32 | decode | {ref['loss_ref']:.4f} | | | | | | |")
        for s, e in r["pip"].items():
            lines.append(row(f"pip {s}", "decode", e))
        lines.append(row("aviary fp32 vs pip fp32", "decode", ref))
    if r.get("decode_path"):
        lines += ["", "Decode path of each Aviary model (`model.decode_path`):", ""]
        lines += [f"- {name}: {p['summary']}" for name, p in r["decode_path"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
