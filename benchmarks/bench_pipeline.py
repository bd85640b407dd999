"""Extraction and loading against their floors, as ratios measured in one process.

1. Extraction: tokens/s of ``saesweep.data.activations`` writing shards, against the bare
   truncated LM forward (``capture_sites``) on the same windows; ratio = extract / bare
   (1.0 = writing is free; the goal is ≥ 0.9).
2. Loading: tokens/s of training steps fed by ``BatchStream`` from the shards, against the
   same steps fed from an in-memory tensor; ratio = shards / memory (goal ≥ 0.95).

Usage (after the default sweep has fetched the model and corpus)::

    .venv/bin/python benchmarks/bench_pipeline.py [--model resources/models/smollm2-135m]
        [--corpus resources/corpus/sotu-1940-2021/train.jsonl] [--site resid8] [--windows 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saesweep.data.activations import ActivationStore, extract
from saesweep.data.corpus import read_split, token_windows
from saesweep.core.files import write_json
from saesweep.sae.topk_kernels import sparse_step
from saesweep.core.job_settings import ExtractionSettings, ModelSettings, from_json
from saesweep.data.lm import capture_sites, load_lm
from saesweep.data.loader import BatchStream
from saesweep.sae.topk import TopKSAE

CPU = torch.device("cpu")  # this benchmark measures the CPU path


def bench_extraction(args: argparse.Namespace, scratch: Path) -> Path:
    """Print bare-forward and extraction tokens/s; return the extracted site folder."""
    model = {"id": args.model, "dtype": args.dtype, "prepend_bos": False, "revision": None, "pypi_gguf": None,
             "hidden_size": None}
    lm, tokenizer = load_lm(ModelSettings(**model), CPU)
    windows = token_windows(read_split(Path(args.corpus)), tokenizer, args.context, False, args.windows)
    kept = (args.context - 1) * len(windows)
    started = time.perf_counter()
    for start in range(0, len(windows), args.batch):
        capture_sites(lm, windows[start : start + args.batch], [args.site])
    bare = kept / (time.perf_counter() - started)
    write_json(scratch / "corpus.json", {"fingerprint": "benchmark"})
    folder = scratch / args.site
    settings = from_json(ExtractionSettings, {
        "split": "train", "model": model, "sites": [args.site], "output_dirs": {args.site: str(folder)},
        "corpus_file": args.corpus, "corpus_summary": str(scratch / "corpus.json"), "context": args.context,
        "skip_positions": 1, "batch_size": args.batch, "tokens": kept, "shard_tokens": args.shard_tokens,
        "storage_dtype": "float16", "device": "cpu", "part_files": [str(scratch / "part.json")],
    }, "benchmark settings")
    started = time.perf_counter()
    extract(settings, (lm, tokenizer))
    full = kept / (time.perf_counter() - started)
    print(f"extraction: bare forward {bare:,.0f} tok/s, extract with shards {full:,.0f} tok/s "
          f"(tokenizing, forward, writing, hashing), ratio {full / bare:.3f}")
    return folder


def bench_loading(folder: Path, args: argparse.Namespace) -> None:
    """Print step tokens/s fed from shards and from memory, and their ratio."""
    store = ActivationStore(folder)
    sae = TopKSAE(store.d, args.n, {"k": args.k})
    sae.initialise(store.head(2048, CPU).sub(store.mean).div(store.scale), torch.Generator().manual_seed(0))
    memory = store.head(store.tokens, CPU).sub(store.mean).div(store.scale)
    budget = (store.tokens // args.train_batch) * args.train_batch

    def run(batches) -> float:
        started, seen = time.perf_counter(), 0
        for x in batches:
            sparse_step(sae, x, None, 0, 0.0)
            seen += len(x)
        return seen / (time.perf_counter() - started)

    from_memory = run(memory[i : i + args.train_batch] for i in range(0, budget, args.train_batch))
    from_shards = run(BatchStream(store, args.train_batch, 0, budget, device=CPU))
    print(f"loading: step fed from memory {from_memory:,.0f} tok/s, from shards {from_shards:,.0f} tok/s, "
          f"ratio {from_shards / from_memory:.3f} (n={args.n}, k={args.k}, batch {args.train_batch})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resources/models/smollm2-135m")
    parser.add_argument("--corpus", default="resources/corpus/sotu-1940-2021/train.jsonl")
    parser.add_argument("--site", default="resid8")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--windows", type=int, default=512)
    parser.add_argument("--shard-tokens", type=int, default=16384)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = bench_extraction(args, Path(scratch))
        bench_loading(folder, args)


if __name__ == "__main__":
    main()
