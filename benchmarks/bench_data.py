"""Peak memory of ``bitnet-a48 train --preset tiny --steps 1`` on generated plain-text corpora, and tokenisation speed.

Corpora: a folder of plain-text files (one document a file, about 2,000 words each) of pseudo-words drawn from a Zipf
law, sized to about 5M and 50M tokens of the tiny preset's BPE (vocabulary 512), 500M with ``--large``; written into a
temporary folder. For each, ``train`` runs twice in a subprocess, first on an empty data cache (reads, trains the
BPE, tokenises, packs, one step), then again (everything from the cache). Reported per run:

* ``peak_rss_mb``: the largest resident set of one process (``ru_maxrss`` of the waited-for process tree, as
  ``/usr/bin/time -v`` reports it); ``tree_peak_mb`` / ``tree_anon_peak_mb``: the peak of the sum over the process
  and its children of VmRSS / RssAnon, sampled every 50 ms (mapped file pages count in VmRSS, not in RssAnon);
* wall time, the tokenisation and packing seconds the cache records, and the disk use of the cache.

Then the tokenisation throughput on the 5M corpus: the pipeline's batched `map` (1 and 2 processes) against a plain
loop of ``tokenizer(batch)`` over the same files (batches of 128 documents), with the same tokenizer.

    nice -n 19 python benchmarks/bench_data.py               # 5M and 50M tokens
    nice -n 19 python benchmarks/bench_data.py --large       # and 500M (about 2 GB of text, 6 GB of cache)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from memory_bandwidth import cpu_description

WORDS_PER_DOC = 2000
TOKENS_PER_WORD = 2.6  # tokens a word of the 512-entry BPE trained on this text (measured)
TARGET_GROWTH_MB = 300  # issue 16: peak RSS grows by less than this from 5M to 50M tokens


def generate_corpus(folder: Path, tokens: int, seed: int = 0) -> int:
    """Write about ``tokens`` tokens of pseudo-English into ``folder/NNNNNN.txt``; returns the characters written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    weights = np.arange(26, 0, -1, dtype=float) ** 2
    vocabulary = np.array(["".join(rng.choice(letters, size=rng.integers(1, 9), p=weights / weights.sum()))
                           for _ in range(20_000)])
    zipf = 1.0 / np.arange(1, len(vocabulary) + 1)
    zipf /= zipf.sum()
    folder.mkdir(parents=True, exist_ok=True)
    chars, docs = 0, int(tokens / TOKENS_PER_WORD / WORDS_PER_DOC) + 1
    for d in range(docs):
        words = vocabulary[rng.choice(len(vocabulary), size=WORDS_PER_DOC, p=zipf)]
        lines = [" ".join(words[i : i + 12]) for i in range(0, WORDS_PER_DOC, 12)]
        text = "\n".join(line.capitalize() + "." for line in lines) + "\n"
        (folder / f"{d:06d}.txt").write_text(text, encoding="utf-8")
        chars += len(text)
    return chars


def _tree_memory(pid: int) -> tuple[int, int]:
    """Sum of VmRSS and of RssAnon (kB) over ``pid`` and its descendants."""
    total = anon = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        total += int(fields.get("VmRSS", "0 kB").split()[0])
        anon += int(fields.get("RssAnon", "0 kB").split()[0])
        todo += [int(c) for c in children]
    return total, anon


def run_train(corpus: Path, cache: Path, output: Path) -> dict[str, float]:
    """One ``train --preset tiny --steps 1`` in a subprocess: peak memory and wall time."""
    command = [sys.executable, "-m", "bitnet_a48.cli", "train", "--preset", "tiny", "--steps", "1", "--data",
               str(corpus), "--data-cache-dir", str(cache), "--output-dir", str(output)]
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    log = output.with_suffix(".log")
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        tree = anon = 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # rusage of this process tree only
            if pid:
                break
            t, a = _tree_memory(process.pid)
            tree, anon = max(tree, t), max(anon, a)
            time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"train failed ({process.returncode}):\n{log.read_text()[-3000:]}")
    peak = usage.ru_maxrss  # kB on Linux
    return {"wall_s": wall, "peak_rss_mb": peak / 1024, "tree_peak_mb": tree / 1024, "tree_anon_peak_mb": anon / 1024}


def cache_facts(cache: Path) -> dict[str, float]:
    """Seconds and sizes the cache recorded, and its disk use."""
    facts: dict[str, float] = {"cache_mb": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20}
    for meta in cache.rglob("tokens.json"):
        tokens = json.loads(meta.read_text())
        facts.update(tokenise_s=tokens["seconds"], pieces=tokens["pieces"], documents=tokens["documents"])
    for meta in cache.rglob("blocks.json"):
        blocks = json.loads(meta.read_text())
        facts.update(pack_s=blocks["seconds"], tokens=blocks["train"]["tokens"] + blocks["validation"]["tokens"])
    return facts


def throughput(corpus: Path, cache: Path, work: Path) -> dict[str, float]:
    """Tokens/s of the pipeline's map (1 and 2 processes) and of a plain ``tokenizer(batch)`` loop, same tokenizer."""
    import datasets

    from bitnet_a48.data_pipeline import CorpusOptions, CorpusPipeline

    datasets.disable_progress_bars()
    tokenizer = CorpusPipeline(CorpusOptions(str(corpus)), cache_dir=cache).bpe_tokenizer(512)
    result: dict[str, float] = {}
    for num_proc in (1, 2):
        fresh = work / f"throughput-{num_proc}"
        pipeline = CorpusPipeline(CorpusOptions(str(corpus)), cache_dir=fresh, num_proc=num_proc)
        pipeline.documents()  # reading the files is not tokenisation
        start = time.perf_counter()
        splits = pipeline.pack(tokenizer, 32)
        seconds = time.perf_counter() - start
        tokens = splits.stats["train"]["tokens"] + splits.stats["validation"]["tokens"]
        result[f"pipeline_num_proc{num_proc}_tokens_per_s"] = tokens / seconds
        shutil.rmtree(fresh)
    files = sorted(corpus.glob("*.txt"))
    start, count = time.perf_counter(), 0
    for i in range(0, len(files), 128):
        batch = [f.read_text(encoding="utf-8") for f in files[i : i + 128]]
        count += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"])
    result["plain_loop_tokens_per_s"] = count / (time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also the 500M-token corpus")
    parser.add_argument("--sizes", type=float, nargs="*", default=None, help="millions of tokens (default 5 50)")
    parser.add_argument("--work-dir", default=None, help="where corpora and caches go (default: a temporary folder)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    sizes = args.sizes or ([5, 50, 500] if args.large else [5, 50])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_"))
    machine = cpu_description()
    print(f"{machine['cpu']}; ISA {', '.join(machine['isa_flags'])}; {machine['logical_cpus']} CPUs", flush=True)
    rows = []
    for millions in sizes:
        corpus, cache = work / f"corpus-{millions:g}M", work / f"cache-{millions:g}M"
        chars = generate_corpus(corpus, int(millions * 1e6))
        row: dict[str, object] = {"target_tokens": millions * 1e6, "characters": chars,
                                  "text_mb": sum(p.stat().st_size for p in corpus.iterdir()) / 2**20}
        row["cold"] = run_train(corpus, cache, work / "run-cold")
        row.update(cache_facts(cache))
        row["warm"] = run_train(corpus, cache, work / "run-warm")
        print(json.dumps(row), flush=True)
        rows.append(row)
        if millions == sizes[0]:
            first_corpus, first_cache = corpus, cache
    speed = throughput(first_corpus, first_cache, work)
    print(json.dumps(speed), flush=True)
    print(f"\n{'tokens':>12} {'text MB':>8} {'cache MB':>9} {'tokenise s':>10} {'pack s':>7} "
          f"{'cold wall s':>11} {'cold peak MB':>12} {'tree MB':>8} {'anon MB':>8} {'warm wall s':>11} "
          f"{'warm peak MB':>12}")
    for r in rows:
        c, w = r["cold"], r["warm"]
        print(f"{r['tokens']:>12,} {r['text_mb']:>8.0f} {r['cache_mb']:>9.0f} {r['tokenise_s']:>10.1f} "
              f"{r['pack_s']:>7.1f} {c['wall_s']:>11.1f} {c['peak_rss_mb']:>12.0f} {c['tree_peak_mb']:>8.0f} "
              f"{c['tree_anon_peak_mb']:>8.0f} {w['wall_s']:>11.1f} {w['peak_rss_mb']:>12.0f}")
    if len(rows) > 1:
        growth = rows[1]["cold"]["peak_rss_mb"] - rows[0]["cold"]["peak_rss_mb"]
        verdict = "met" if growth < TARGET_GROWTH_MB else "missed"
        print(f"peak RSS growth {rows[0]['tokens']:,} -> {rows[1]['tokens']:,} tokens: {growth:.0f} MB "
              f"(target < {TARGET_GROWTH_MB} MB: {verdict})")
    if args.output:
        Path(args.output).write_text(json.dumps({"machine": machine, "rows": rows, "throughput": speed}, indent=1))


if __name__ == "__main__":
    main()
