"""Sentence embeddings on offline retrieval tasks built from real aligned text, against TF-IDF.

    udhr   the Universal Declaration of Human Rights (../shared/data/tokenizer/multilingual.jsonl.xz): its 30
           articles (bodies only; the "Article N" headings are dropped) in every language whose headings can be
           found (`udhr_articles`); each non-English article is a query, the 30 English articles the pool:
           cross-lingual retrieval, recall@1 (chance 1/30)
    bible  paraphrase retrieval: N verses of Genesis and Exodus from the World English Bible (the shared corpus,
           `web_bible`, one verse a line) as queries, the same verses of the King James Version (Debian's
           `bible-kjv`, read with its `bible` command) as the pool; recall@1 among N (chance 1/N)

Each embedding method (aviary.embeddings) ranks the pool by cosine similarity; the baselines are scikit-learn's
TF-IDF over words and over character 2-4-grams (`char_wb`), fitted on the queries and the pool together.

    python benchmarks/bench_embeddings.py                          # the bundled default model, both tasks
    python benchmarks/bench_embeddings.py --model m.pth --methods mean last --tasks bible --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import lzma
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---- the tasks -----------------------------------------------------------------------------------------------

def udhr_articles(path: Path) -> dict[str, list[str]]:
    """{language: its 30 article bodies} for the languages whose article headings are found: the lines of at
    most 40 characters sharing the most common 1-3 character prefix, exactly 30 of them ("Article 1", "第一条",
    "Статья 1"). Languages where no prefix gives exactly 30, or an article comes out empty, are left out."""
    out = {}
    with lzma.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    for doc in docs:
        if not doc["name"].startswith("udhr_"):
            continue
        lines = [x.strip() for x in doc["text"].split("\n")]
        short = [(i, x) for i, x in enumerate(lines) if 0 < len(x) <= 40]
        for n in (1, 2, 3):
            prefix, count = collections.Counter(x[:n] for _, x in short).most_common(1)[0]
            if count == 30:
                heads = [i for i, x in short if x[:n] == prefix] + [len(lines)]
                bodies = [" ".join(x for x in lines[a + 1:b] if x) for a, b in zip(heads, heads[1:], strict=False)]
                if all(bodies):  # an empty body: headings and text mixed up
                    out[doc["name"].removeprefix("udhr_")] = bodies
                break
    return out


def udhr_task(path: Path) -> tuple[list[str], list[str], list[int], dict]:
    """(queries, pool, the pool index each query should find, details)."""
    articles = udhr_articles(path)
    english = articles.pop("eng")
    queries, gold = [], []
    for lang in sorted(articles):
        queries += articles[lang]
        gold += list(range(30))
    return queries, english, gold, {"languages": sorted(articles), "queries": len(queries), "pool": 30}


def bible_task(n: int, seed: int = 0) -> tuple[list[str], list[str], list[int], dict]:
    if shutil.which("bible") is None:
        raise SystemExit("the bible task needs Debian's bible-kjv package: apt-get install -y bible-kjv")
    with lzma.open(DATA / "corpus" / "train.jsonl.xz", "rt", encoding="utf-8") as f:
        web = next(doc for doc in map(json.loads, f) if doc["source"] == "web_bible")["text"].split("\n")
    start = next(i for i, x in enumerate(web) if x.startswith("In the beginning, God"))
    kjv = subprocess.run(["bible", "-f", "Ge1:1-Ex40:38"], capture_output=True, text=True, check=True).stdout
    kjv = [x.split(" ", 1)[1] for x in kjv.strip().split("\n")]  # "Ge1:1 In the beginning ..."
    web = web[start:start + len(kjv)]  # one verse a line: Genesis 1:1 ... Exodus 40:38 (2,746 verses)
    assert web[-1].startswith("For the cloud of Yahweh") and kjv[-1].startswith("For the cloud of the LORD")
    pick = sorted(random.Random(seed).sample(range(len(kjv)), n))
    return [web[i] for i in pick], [kjv[i] for i in pick], list(range(n)), {"queries": n, "pool": n,
                                                                           "verses": "Genesis 1:1-Exodus 40:38"}


# ---- scoring -------------------------------------------------------------------------------------------------

def recall_at_1(q, p, gold: list[int]) -> float:
    """q [Nq, D], p [Np, D] L2-normalised (torch or scipy sparse) -> share of queries whose best match is gold."""
    import numpy as np

    sims = q @ p.T
    sims = sims.toarray() if hasattr(sims, "toarray") else np.asarray(sims)
    return float((sims.argmax(1) == np.asarray(gold)).mean())


def tfidf(queries: list[str], pool: list[str], gold: list[int], analyzer: str) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer=analyzer, ngram_range=(2, 4) if analyzer == "char_wb" else (1, 1))
    vec.fit(queries + pool)
    return recall_at_1(vec.transform(queries), vec.transform(pool), gold)  # rows are L2-normalised


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument("--methods", nargs="+", default=["last", "mean", "state"])
    parser.add_argument("--tasks", nargs="+", default=["udhr", "bible"], choices=["udhr", "bible"])
    parser.add_argument("--verses", type=int, default=1000, help="bible pool size (default 1000)")
    parser.add_argument("--udhr-tokens", type=int, default=64, metavar="N",
                        help="keep the first N tokens of each UDHR article, for queries, pool and TF-IDF alike "
                             "(default 64; 0: whole articles, ~285k tokens)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    import aviary
    from aviary.embeddings import embed_methods
    from aviary.models import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(default_model_path())
    model = aviary.load(path)
    tokenizer = aviary.load_tokenizer(version=model.config.version)
    tasks = {}
    if "udhr" in args.tasks:
        queries, pool, gold, details = udhr_task(DATA / "tokenizer" / "multilingual.jsonl.xz")
        if args.udhr_tokens:
            def cut(text):
                return tokenizer.decode_bytes(tokenizer.encode(text)[:args.udhr_tokens]).decode("utf-8", "ignore")

            queries, pool = [cut(t) for t in queries], [cut(t) for t in pool]
            details["first_tokens"] = args.udhr_tokens
        tasks["udhr"] = queries, pool, gold, details
    if "bible" in args.tasks:
        tasks["bible"] = bible_task(args.verses)
    results = {"model": path, "config": vars(model.config) if hasattr(model.config, "__dict__") else str(
        model.config), "torch_threads": torch.get_num_threads(), "tasks": {}}
    print(f"model {path}\n")
    print(f"| task | {' | '.join(['chance', 'tfidf-word', 'tfidf-char', *args.methods])} |")
    print(f"|---|{'---|' * (3 + len(args.methods))}")
    for name, (queries, pool, gold, details) in tasks.items():
        row = {"chance": 1 / len(pool), "tfidf-word": tfidf(queries, pool, gold, "word"),
               "tfidf-char": tfidf(queries, pool, gold, "char_wb")}
        t0 = time.perf_counter()
        embedded = embed_methods(model, tokenizer, queries + pool, args.methods, batch_size=32)  # one pass
        seconds = time.perf_counter() - t0
        for method, vectors in embedded.items():
            row[method] = recall_at_1(vectors[:len(queries)], vectors[len(queries):], gold)
        results["tasks"][name] = {**details, "recall@1": row, "embed_seconds_all_methods": seconds}
        print(f"| {name} ({details['queries']} queries, pool {details['pool']}) | "
              + " | ".join(f"{v:.3f}" for v in row.values()) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
