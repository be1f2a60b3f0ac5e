"""lm-evaluation-harness on Aviary models: the offline task pack and the launcher `aviary eval harness`.

The adapter itself, `AviaryLM` (registered with lm-eval as "aviary"), is in `aviary.eval.harness_lm`; it is
reachable here too (`aviary.eval.harness.AviaryLM`, imported on first use). This module imports neither
lm-eval nor torch until a function needs them, so the command line's `--help` stays fast and works without
the `eval` extra.

Tasks. Every task built into lm-eval downloads its data from the Hugging Face Hub. The ones in
`aviary/eval/tasks/*.yaml` read local files instead (`dataset_path: json`), named relative to a data directory:

    aviary_lambada_openai   eval/lambada_openai.jsonl.xz   lm-eval's lambada_openai protocol: perplexity, acc
    aviary_lambada_austen   eval/lambada_austen.jsonl      the same on the project's Austen set
    aviary_corpus_ppl       corpus/valid.jsonl.xz          word/byte perplexity, bits per byte, whole documents

`task_manager(data_dir)` writes copies of them with absolute paths and returns an
`lm_eval.tasks.TaskManager` that knows them (and, unless include_defaults=False, every built-in task). The tag
`aviary` names all three.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aviary.eval.harness_lm import AviaryLM

__all__ = ["AviaryLM", "TASKS_DIR", "add_harness_arguments", "run_harness", "task_manager"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# the project's layout: the shared data beside the repository (../shared/data from its root)
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def __getattr__(name: str):
    if name == "AviaryLM":
        from aviary.eval.harness_lm import AviaryLM

        return AviaryLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def local_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_manager(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *, include_defaults: bool = True,
                 work_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """An `lm_eval.tasks.TaskManager` that knows Aviary's local tasks, their data read from `data_dir`.

    The task files name their data relative to a data directory; here they are rewritten with absolute paths
    into `work_dir` (default: a temporary directory removed with the TaskManager). `cache_dir`: where
    `datasets` keeps its Arrow copies (default: its own, ~/.cache/huggingface/datasets). include_defaults=False
    leaves lm-eval's built-in tasks out (indexing their ~14,000 files takes seconds). A task whose data
    file is missing is left out, with a warning naming the file."""
    import shutil
    import tempfile
    import warnings
    import weakref

    import yaml
    from lm_eval.tasks import TaskManager

    data_dir = Path(data_dir).expanduser().resolve()
    temporary = work_dir is None
    out = Path(tempfile.mkdtemp(prefix="aviary-tasks-") if temporary else work_dir)
    out.mkdir(parents=True, exist_ok=True)
    for source in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(source.read_text())
        kwargs = config.setdefault("dataset_kwargs", {})
        files = {split: data_dir / name for split, name in kwargs["data_files"].items()}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            warnings.warn(f"task {config['task']} left out: no {', '.join(missing)} (give the data directory "
                          "that holds eval/ and corpus/)", stacklevel=2)
            continue
        kwargs["data_files"] = {split: str(f) for split, f in files.items()}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        (out / source.name).write_text(yaml.safe_dump(config, sort_keys=False))
    manager = TaskManager(include_path=str(out), include_defaults=include_defaults)
    if temporary:
        weakref.finalize(manager, shutil.rmtree, out, True)
    return manager


# ---- the launcher: `aviary eval harness` ------------------------------------------------------------------

HARNESS_HELP = "run lm-evaluation-harness tasks (Aviary's offline ones, or any built-in task with internet)"

HARNESS_EPILOG = """\
local tasks (offline, data from --data-dir): aviary_lambada_openai, aviary_lambada_austen, aviary_corpus_ppl
(the tag `aviary` runs all three). Any built-in lm-eval task works too where the Hugging Face Hub is reachable:

  aviary eval harness --tasks aviary_lambada_openai --limit 200
  aviary eval harness -m model.pth --tasks aviary --dtype bfloat16 --json results.json
  aviary eval harness -m model.pth --tasks hellaswag,piqa,arc_easy,lambada_openai   # needs the Hub
"""


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `aviary eval harness` (model options come from `add_model_arguments`)."""
    from aviary.commands._common import add_model_arguments

    parser.epilog = HARNESS_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("-m", "--model", default=None, metavar="PATH", help="checkpoint (default: the bundled model)")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated lm-eval task names, tags or groups (local: " +
                             ", ".join(local_task_names()) + ")")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (a number below 1: that fraction); default all")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together by generation tasks")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                        help=f"the folder with eval/ and corpus/ the local tasks read (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write lm-eval's results as JSON here")
    parser.add_argument("--log-samples", action="store_true", help="keep every request and answer in --json")
    parser.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and sampled generation")
    parser.add_argument("--bootstrap-iters", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the standard error of perplexities (lm-eval's own default, "
                             "100000, takes minutes; 0: none)")
    add_model_arguments(parser)


def run_harness(args: argparse.Namespace) -> int:
    """Load the model, run `lm_eval.simple_evaluate` on the tasks, print lm-eval's table; --json: JSON too."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError("lm-evaluation-harness is not installed: pip install 'aviary[eval]'") from None
    from lm_eval.utils import make_table

    from aviary.commands._common import load_model
    from aviary.eval.harness_lm import AviaryLM

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    data_dir = Path(args.data_dir)
    local = set(local_task_names()) | {"aviary"}
    if any(t in local for t in tasks) and not data_dir.is_dir():
        raise FileNotFoundError(f"no data directory {data_dir}: give --data-dir, the folder that holds "
                                "eval/lambada_openai.jsonl.xz, eval/lambada_austen.jsonl and corpus/valid.jsonl.xz")
    manager = task_manager(data_dir, include_defaults=not all(t in local for t in tasks))
    model, tokenizer, state = load_model(args, args.model)
    lm = AviaryLM(model, tokenizer=tokenizer, state=state, batch_size=args.batch_size)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=args.log_samples,
                                      bootstrap_iters=args.bootstrap_iters,
                                      random_seed=args.seed, numpy_random_seed=args.seed,
                                      torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    if results is None:  # a non-zero rank of a distributed run: nothing to report
        return 0
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
