"""Peak resident memory of training and evaluating one cell at the paper's GPT-2 small shape.

One TopK cell at d = 768, n = 131,072, k = 32 (AuxK on, the paper's recipe), trained for a
few steps of gpt2-small's batch (4096 tokens) through the library's trainer, then
evaluated through the library's evaluate stage, on activations of a tiny randomly
initialised GPT-2 of width 768 (transformers ``GPT2Config``, 2 blocks, GPT-2's vocabulary of
50,257 entries, a 300-token BPE tokenizer trained on generated text; nothing is
downloaded). The shards are extracted here by the library (float16, as gpt2-small's); the
held-out text is generated like the training text (memory does not depend on the text).
Train and evaluate each run in their own subprocess (``saesweep train`` / ``saesweep
evaluate``); the script prints each child's peak resident memory (``ru_maxrss`` from
``wait4``) and what ``saesweep.plan.budget`` asks for.

Evaluation sizes are config/gpt2-small.yaml's ``evaluate.*`` times ``--fraction``-style
flags (defaults: tokens 1/61, downstream windows 1/64, LM batch 1/8, analysis windows 1/8,
chunk 1/4; probe candidates, explained and ablated latents, ablation windows in full); the
memory terms that depend on T and n are T·(U + 1) and (tasks, n), never T · n.

    .venv/bin/python benchmarks/bench_paper_shape.py
    .venv/bin/python benchmarks/bench_paper_shape.py --analysis-windows 2048 --steps 2

Disk: a few hundred MB in a temporary folder (the SAE, 0.8 GB, and its checkpoint), removed.
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
from typing import Any

from bench_extract_memory import build_corpus, build_tokenizer, make_text

D, N, K, BATCH, SITE = 768, 131_072, 32, 4096, "resid1"
"""The cell: config/gpt2-small.yaml's largest, its batch; the tiny GPT-2's last block."""


def build_gpt2(folder: Path, sample: Path, layers: int) -> None:
    """A randomly initialised GPT-2 of width 768 with ``layers`` blocks and the BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(folder, sample)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=D, n_layer=layers, n_head=12, n_positions=128, vocab_size=50257,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)


def bench_config(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The run's config: gpt2-small's activations and training batch, the evaluation sizes
    of the flags, one cell; the held-out curve during training off (``heldout.points`` 0)."""
    analysis_tokens = args.analysis_windows * 63
    return {
        "run": "paper-shape",
        "model": {"id": str(model), "dtype": "float32"},
        "corpus": {"name": "bench", "source": "files", "include": ["unused"]},
        "activations": {"sites": [SITE], "context": 64, "skip_positions": 1, "batch_size": 64,
                        "train_tokens": args.steps * BATCH + 63, "eval_tokens": max(args.tokens, analysis_tokens) + 63,
                        "shard_tokens": 16_384, "storage_dtype": "float16"},
        "sweep": {"n_latents": [N], "k": [K], "seeds": [0]},
        "train": {"tokens": {"base": args.steps * BATCH, "n_ref": N, "n_exponent": 0.0, "min": BATCH},
                  "batch_size": BATCH, "geometric_median_sample": BATCH, "checkpoint_every_tokens": 10**9,
                  "log_every_tokens": BATCH, "heldout": {"points": 0}, "device": "cpu"},
        "evaluate": {"tokens": args.tokens, "downstream_windows": args.downstream_windows,
                     "lm_batch_size": args.lm_batch_size, "analysis_windows": args.analysis_windows,
                     "batch_size": args.chunk},
    }


def run_child(stage: list[str], log: Path) -> tuple[float, float]:
    """Run ``saesweep`` with ``stage``'s arguments; (peak RSS GiB, seconds) of the child."""
    code = "import sys; from saesweep.cli import main; sys.exit(main(sys.argv[1:]))"
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-c", code, *stage], stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"saesweep {stage[0]} failed ({process.returncode}):\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - started  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps of 4096 tokens")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the tiny GPT-2 (the site is resid1)")
    parser.add_argument("--tokens", type=int, default=16_384, help="evaluate.tokens (gpt2-small: 1,000,000)")
    parser.add_argument("--downstream-windows", type=int, default=16, help="evaluate.downstream_windows (gpt2-small: 1024)")
    parser.add_argument("--lm-batch-size", type=int, default=8, help="evaluate.lm_batch_size (gpt2-small: 64)")
    parser.add_argument("--analysis-windows", type=int, default=256, help="evaluate.analysis_windows (gpt2-small: 2048)")
    parser.add_argument("--chunk", type=int, default=4096, help="evaluate.batch_size, the chunk (gpt2-small: 16384)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each stage")
    args = parser.parse_args()

    from saesweep.core.job_settings import to_json
    from saesweep.data.activations import extract
    from saesweep.plan import budget
    from saesweep.plan.config import validate_config
    from saesweep.plan.settings import cell_dir, corpus_dir, eval_settings, extraction_settings, train_settings

    scratch = Path(tempfile.mkdtemp(prefix="bench-paper-shape-"))
    os.chdir(scratch)
    try:
        (scratch / "sample.txt").write_text("".join(make_text(seed, 400) for seed in range(20)))
        build_gpt2(scratch / "model", scratch / "sample.txt", args.layers)
        config = validate_config(bench_config(scratch / "model", args))
        corpus = Path(corpus_dir(config))
        corpus.mkdir(parents=True)
        for split in ("train", "eval"):
            tokens = config["activations"]["train_tokens" if split == "train" else "eval_tokens"]
            build_corpus(corpus / f"{split}.jsonl", scratch / "model", tokens * 11 // 10)
        (corpus / "corpus.json").write_text(json.dumps({"fingerprint": "generated"}))
        for split in ("train", "eval"):
            extract(extraction_settings(config, split, device="cpu"))
        cell = f"topk-n{N}-k{K}-s0"
        folder = Path(cell_dir(config, SITE, cell))
        folder.mkdir(parents=True)
        for stage, build in (("train", train_settings), ("eval", eval_settings)):
            (scratch / f"{stage}_settings.json").write_text(json.dumps(to_json(build(config, SITE, cell))))
        evaluate = config["evaluate"]
        print(f"d = {D}, n = {N:,}, k = {K}; train: {args.steps} steps of {BATCH} tokens; evaluate: tokens "
              f"{evaluate['tokens']:,}, downstream windows {evaluate['downstream_windows']}, LM batch "
              f"{evaluate['lm_batch_size']}, analysis windows {evaluate['analysis_windows']} "
              f"(T = {evaluate['analysis_windows'] * 63:,}), chunk {evaluate['batch_size']}, probe candidates "
              f"{evaluate['probe_candidates']}, explained {evaluate['explain_latents']}, ablated "
              f"{evaluate['ablation_latents']}; {args.threads} threads", flush=True)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the evaluate stage's torch threads
        train_rss, train_s = run_child(["train", "--settings", "train_settings.json", "--out", str(folder),
                                        "--threads", str(args.threads)], scratch / "train.log")
        print(f"train peak RSS: {train_rss:.2f} GiB", flush=True)
        eval_rss, eval_s = run_child(["evaluate", "--settings", "eval_settings.json", "--cell", str(folder),
                                      "--out", "metrics.json"], scratch / "evaluate.log")
        print(f"evaluate peak RSS: {eval_rss:.2f} GiB", flush=True)
        shard_tokens = config["activations"]["shard_tokens"]
        train_mb = budget.train_mem_mb(train_settings(config, SITE, cell), D, shard_tokens)
        terms = budget.evaluate_bytes(config, D, N)
        metrics = json.loads(Path("metrics.json").read_text())
        print(f"train {train_s:.0f} s, evaluate {eval_s:.0f} s; plan asks train {train_mb / 1024:.2f} GiB (MB/1024), "
              f"evaluate {budget.evaluate_mem_mb(config, D, N) / 1024:.2f} GiB: "
              + ", ".join(f"{name} {value / 2**30:.2f}" for name, value in terms.items()))
        print("metrics: " + ", ".join(f"{name} {metrics[name]:.4g}" for name in (
            "nmse", "l0", "delta_lm_loss", "probe_loss", "explain_precision", "ablation_sparsity")))
    finally:
        os.chdir("/")
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
