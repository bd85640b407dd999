"""Peak resident memory of extraction against the number of tokens extracted.

Builds a tiny Llama (d = 32, 4 blocks) with a byte-level BPE tokenizer and a generated
English-like corpus big enough for the largest count, then runs ``extract`` once per token
count, each in a fresh subprocess, and prints the subprocess's peak resident memory
(Linux ``VmHWM``) at three moments: after imports and model loading (the baseline), and
at the end of the extraction; the difference is what extraction itself holds. Streaming
extraction holds one shard's windows and activations, so the difference should not grow
with the token count.

    .venv/bin/python benchmarks/bench_extract_memory.py                      # 1e5, 1e6, 1e7 tokens
    .venv/bin/python benchmarks/bench_extract_memory.py --tokens 100000 1000000 3000000

Disk: the shards take tokens · d · 2 bytes (float16): 640 MB at 10⁷ tokens, removed after
each count unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to a in that is was he for it with as his on be at by i this had not are but from or "
    "have an they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people state "
    "union nation congress president war peace law year world government country American economy"
).split()


def make_text(seed: int, sentences: int) -> str:
    """Deterministic English-like prose: capitalised sentences of common words and numbers."""
    rng = random.Random(seed)
    parts = []
    for index in range(sentences):
        words = rng.choices(WORDS, k=rng.randint(5, 14))
        if rng.random() < 0.2:
            words.insert(rng.randint(0, len(words)), str(rng.randint(1, 2020)))
        parts.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]) + ("\n\n" if index % 7 == 6 else " "))
    return "".join(parts)


def build_tokenizer(folder: Path, sample: Path):
    """A 300-token byte-level BPE tokenizer trained on ``sample``, saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(sample)], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    wrapped.save_pretrained(folder)
    return wrapped


def build_model(folder: Path, sample: Path) -> None:
    """A 4-block Llama (d = 32) and a 300-token BPE tokenizer trained on ``sample``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    wrapped = build_tokenizer(folder, sample)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(wrapped), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=wrapped.eos_token_id, bos_token_id=None, pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def build_corpus(path: Path, tokenizer_folder: Path, tokens: int) -> int:
    """Write documents of generated prose to ``path`` (JSON lines) until they hold at least
    ``tokens`` tokens; return the number of documents."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    have, count = 0, 0
    with open(path, "w") as handle:
        while have < tokens:
            text = make_text(1000 + count, 400)
            have += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
            handle.write(json.dumps({"name": f"doc{count:06d}", "text": text}) + "\n")
            count += 1
    return count


def high_water_mib() -> float:
    """Peak resident memory of this process so far (``VmHWM``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One extraction of ``args.tokens[0]`` tokens; prints a JSON line of memory and time."""
    import torch

    from saesweep.core.job_settings import ExtractionSettings, ModelSettings, from_json
    from saesweep.data.activations import extract
    from saesweep.data.lm import load_lm

    torch.set_num_threads(args.threads)
    scratch = Path(args.scratch)
    model = {"id": str(scratch / "model"), "dtype": "float32", "prepend_bos": False, "revision": None,
             "pypi_gguf": None, "hidden_size": None}
    loaded = load_lm(ModelSettings(**model), torch.device("cpu"))
    baseline = high_water_mib()
    out = scratch / f"out-{args.tokens[0]}"
    settings = from_json(ExtractionSettings, {
        "split": "train", "model": model, "sites": [args.site], "output_dirs": {args.site: str(out / args.site)},
        "corpus_file": str(scratch / "train.jsonl"), "corpus_summary": str(scratch / "corpus.json"),
        "context": args.context, "skip_positions": 1, "batch_size": args.batch, "tokens": args.tokens[0],
        "shard_tokens": args.shard_tokens, "storage_dtype": "float16", "device": "cpu",
        "part_files": [str(out / "part-0000.json")],
    }, "benchmark settings")
    started = time.perf_counter()
    extract(settings, loaded)
    seconds = time.perf_counter() - started
    manifest = json.loads((out / args.site / "manifest.json").read_text())
    disk = sum(shard["bytes"] for shard in manifest["shards"])
    print(json.dumps({"tokens": manifest["tokens"], "baseline_mib": baseline, "peak_mib": high_water_mib(),
                      "seconds": seconds, "shards": len(manifest["shards"]), "disk_mb": disk / 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--site", default="resid1")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="windows per forward (activations.batch_size)")
    parser.add_argument("--shard-tokens", type=int, default=131072, help="activations.shard_tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the extraction")
    parser.add_argument("--scratch", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the shards")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-extract-memory-"))
    scratch.mkdir(parents=True, exist_ok=True)
    if not (scratch / "train.jsonl").exists():
        (scratch / "sample.txt").write_text("".join(make_text(seed, 400) for seed in range(20)))
        build_model(scratch / "model", scratch / "sample.txt")
        documents = build_corpus(scratch / "train.jsonl", scratch / "model", max(args.tokens) * 11 // 10)
        (scratch / "corpus.json").write_text(json.dumps({"fingerprint": f"generated-{documents}"}))
    free = shutil.disk_usage(scratch).free
    print(f"scratch {scratch} ({free / 1e9:.0f} GB free); d = 32, float16 storage, context {args.context}, "
          f"batch {args.batch} windows, shard {args.shard_tokens} tokens, {args.threads} torch thread(s)")
    print(f"{'tokens':>10} {'baseline MiB':>12} {'peak MiB':>9} {'extraction MiB':>14} {'shards':>6} {'disk MB':>8} {'tok/s':>8}")
    for tokens in args.tokens:
        command = [sys.executable, __file__, "--child", "--scratch", str(scratch), "--tokens", str(tokens),
                   "--site", args.site, "--context", str(args.context), "--batch", str(args.batch),
                   "--shard-tokens", str(args.shard_tokens), "--threads", str(args.threads)]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"extraction of {tokens} tokens failed:\n{finished.stderr[-3000:]}")
        row = json.loads(finished.stdout.strip().splitlines()[-1])
        print(f"{row['tokens']:>10,} {row['baseline_mib']:>12.0f} {row['peak_mib']:>9.0f} "
              f"{row['peak_mib'] - row['baseline_mib']:>14.0f} {row['shards']:>6} {row['disk_mb']:>8.0f} "
              f"{row['tokens'] / row['seconds']:>8,.0f}", flush=True)
        if not args.keep:
            shutil.rmtree(scratch / f"out-{tokens}")
    if not args.scratch:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
