"""Fixtures: a tiny randomly initialised causal LM with its own tokenizer, and a text
corpus, both built here (no download), plus a config for a tiny sweep on them."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["browser"]  # the browser_page fixture: pages in a headless Chromium (tests/browser.py)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")  # the device of the tests that run on this machine's processor
WORDS = (
    "the of and to a in that is was he for it with as his on be at by i this had not are but from or "
    "have an they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people state "
    "union nation congress president war peace law year world government country American economy"
).split()


def make_text(seed: int, sentences: int) -> str:
    """Deterministic English-like prose: capitalised sentences of common words, some
    numbers, quotes and paragraph breaks."""
    rng = random.Random(seed)
    parts = []
    for index in range(sentences):
        words = rng.choices(WORDS, k=rng.randint(5, 14))
        if rng.random() < 0.2:
            words.insert(rng.randint(0, len(words)), str(rng.randint(1, 2020)))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])
        if rng.random() < 0.1:
            sentence = f'"{sentence}"'
        parts.append(sentence + ("\n\n" if index % 7 == 6 else " "))
    return "".join(parts)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 text documents (about 60k characters in all)."""
    folder = tmp_path_factory.mktemp("corpus")
    for index in range(12):
        (folder / f"doc{index:02d}.txt").write_text(make_text(index, 110))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A 4-block Llama (d = 32) with a word-level BPE tokenizer trained on the corpus,
    saved as a normal transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import torch

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(p) for p in sorted(tiny_corpus.glob("*.txt"))], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    wrapped.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(wrapped), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=wrapped.eos_token_id, bos_token_id=None, pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """Tiny matrices are far faster on one torch thread, above all on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(model: Path, corpus: Path, **overrides: Any) -> dict[str, Any]:
    """A complete config for a 2 × 2 sweep on the tiny model, minutes → seconds; each
    override sets (or, with None, removes) a dotted key."""
    config: dict[str, Any] = {
        "run": "tiny",
        "model": {"id": str(model), "dtype": "float32"},
        "corpus": {"name": "tiny", "source": "files", "include": [f"{corpus}/*.txt"], "eval_fraction": 0.25},
        "activations": {"sites": ["resid2"], "context": 32, "batch_size": 8, "train_tokens": 6000,
                        "eval_tokens": 2000, "shard_tokens": 1500, "storage_dtype": "float32"},
        "sweep": {"n_latents": [64, 256], "k": [4, 16], "seeds": [0]},
        "train": {"tokens": {"base": 12000, "n_ref": 64, "n_exponent": 0.0}, "batch_size": 256,
                  "lr": {"base": 4e-3, "n_ref": 64},
                  "dead": {"min_tokens": 2000, "factor": 10}, "geometric_median_sample": 512,
                  "checkpoint_every_tokens": 3000, "log_every_tokens": 1024, "device": "cpu"},
        "evaluate": {"tokens": 2000, "downstream_windows": 8, "analysis_windows": 32, "explain_latents": 8,
                     "ablation_tokens": 2, "ablation_latents": 0, "refine_tokens": 256, "ablation_windows": 2, "batch_size": 512},
        "scaling": {"metrics": ["nmse", "delta_lm_loss"], "bootstrap": 20},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


TIMING_COLUMNS = ["tokens_per_s", "train_seconds"]  # wall-clock: the only part of a training log that may differ between runs


def read_log(folder: Path):
    import pandas as pd

    return pd.read_parquet(folder / "train_log.parquet")


def assert_same_training(a: Path, b: Path) -> None:
    """Two cell folders hold the same training: bit-identical weights and buffers, identical
    logs (timing aside), the same number of tokens."""
    import json

    import pandas as pd
    import torch
    from safetensors.torch import load_file

    left, right = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert sorted(left) == sorted(right)
    for name in left:
        assert torch.equal(left[name], right[name]), name
    pd.testing.assert_frame_equal(read_log(a).drop(columns=TIMING_COLUMNS), read_log(b).drop(columns=TIMING_COLUMNS))
    tokens = [json.loads((folder / "cfg.json").read_text())["training"]["tokens"] for folder in (a, b)]
    assert tokens[0] == tokens[1]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the repository's workflow in ``workdir`` with the config written there."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
