"""`saesweep plan`: job counts equal Snakemake's own, sizes equal hand-computed ones and what
extraction and training really write, the rules' resources come from the same functions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_config
from saesweep.cli import main
from saesweep.core.errors import UserError
from saesweep.data.activations import extract
from saesweep.data.corpus import prepare_corpus
from saesweep.plan import budget
from saesweep.plan.config import check_against_model_folder, validate_config
from saesweep.plan.settings import corpus_dir, extraction_settings, train_settings
from saesweep.sae.registry import ARCHITECTURES, build_sae


def tiny(model: Path, corpus: Path, **overrides) -> dict:
    return validate_config(tiny_config(model, corpus, **overrides))


def test_numbers_of_a_small_config_by_hand(tiny_model, tiny_corpus) -> None:
    config = tiny(tiny_model, tiny_corpus)  # d = 32, context 32, skip 1, float32, 2 × 2 TopK cells
    assert budget.model_width(config) == (32, f"{tiny_model}/config.json")
    # train: ⌈6000 / 31⌉ = 194 windows of 31 kept rows; values 6014 · 32 · 4 bytes, ids 194 · 32 · 4
    assert budget.activation_footprint(config, "train", 32) == {
        "windows": 194, "tokens": 6014, "activation_bytes": 769_792, "token_id_bytes": 24_832, "bytes": 794_624}
    # eval: ⌈2000 / 31⌉ = 65 windows
    assert budget.activation_footprint(config, "eval", 32)["tokens"] == 2015
    # topk n=64, d=32: W_enc, W_dec 2048 floats each, b_enc 64, b_pre 32, act_mean 32, act_scale 1
    stored, trained = budget.tensor_bytes("topk", 64, 32, {"k": 4, "lr_factor": 1.0})
    assert (stored, trained) == (4 * 4225, 4 * 4192)
    assert budget.checkpoint_bytes(stored, trained, 64, 0.0) == 16_900 + 2 * 16_768 + 8 * 64
    assert budget.checkpoint_bytes(stored, trained, 64, 0.999) == 16_900 + 3 * 16_768 + 8 * 64  # + the EMA's copy
    settings = train_settings(config, "resid2", "topk-n256-k4-s0")  # 12000 tokens, batch 256, cpu
    # 1500 MB + (4 · (8 · 256 · 32 + 3 · 256 · 256) + 8 · 1500 · 32 · 2) / 1e6
    assert budget.train_mem_mb(settings, 32, 1500) == 1500 + int((4 * (65_536 + 196_608) + 768_000) / 1e6)
    hours = 6 * 12000 * 256 * 32 / 1e10 / 3600
    assert budget.train_hours(settings, 32) == pytest.approx(hours)
    assert budget.train_runtime_min(settings, 32) == 11  # ⌈10 + 2 · 60 · 1.6e-4⌉
    summary = budget.plan(config)
    assert [c["cell"] for c in summary["cells"]] == ["topk-n64-k4-s0", "topk-n256-k4-s0", "topk-n64-k16-s0", "topk-n256-k16-s0"]
    assert summary["hours"]["evaluate_cell"]["asked"] == 4 * 30 / 60
    assert summary["disk_bytes"] == (794_624 + 65 * 31 * 32 * 4 + 65 * 32 * 4
                                     + sum(c["sae_bytes"] for c in summary["cells"]))


def test_evaluation_memory_by_hand(tiny_model, tiny_corpus) -> None:
    """evaluate: 2000 tokens, 32 analysis windows of 31 kept rows (T = 992), chunk 512, LM batch
    8 windows of 32, 64 probe candidates, 8 explained latents; 10 token tasks; the tiny LM
    has 4 blocks of d = 32 and V entries in its vocabulary."""
    config = tiny(tiny_model, tiny_corpus)
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert budget.lm_shape(config) == (4, vocab)
    terms = budget.evaluate_bytes(config, 32, 64)
    assert terms == {
        "base": 2_000_000_000,
        "sae": 4 * (2 * 64 * 32 + 3 * 64 + 3 * 32),  # 17,536
        "lm": 4 * (12 * 4 * 32 * 32 + vocab * 32),
        "chunk": (4 * 3 + 8) * 512 * 64,  # 655,360
        "activations": 4 * (2000 + 992) * 32,  # 382,976
        "logits": 4 * 7 * 8 * 32 * vocab,
        # U = min(64, 10 · 64 + 8) = 64 chosen columns
        "analysis": 8 * (6 + 30) * 64 + 4 * 992 * 65 + 992 * 10 + 8 * 12 * 992 * 64,  # 6,381,120
    }
    assert budget.evaluate_mem_mb(config, 32, 64) == math.ceil(sum(terms.values()) / 1e6)
    # the analysis term grows with T + n, not T · n: 16× the windows and 16× the latents
    bigger = tiny(tiny_model, tiny_corpus, **{"evaluate.analysis_windows": 512, "activations.eval_tokens": 16_000})
    grown = budget.evaluate_bytes(bigger, 32, 1024)["analysis"]
    assert grown == 8 * 36 * 1024 + 4 * 15_872 * 649 + 15_872 * 10 + 8 * 12 * 15_872 * 64
    assert budget.lm_shape(tiny(Path("no/such/model"), tiny_corpus)) == budget.DEFAULT_LM_SHAPE
    assert [c["eval_mem_mb"] for c in budget.plan(config)["cells"]] == [
        budget.evaluate_mem_mb(config, 32, n) for n in (64, 256, 64, 256)]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sae_sizes_equal_a_real_sae_of_every_architecture(arch) -> None:
    cls = ARCHITECTURES[arch]
    params = {p.name: p.default for p in cls.all_arch_parameters()} | dict(cls.example)
    sae = build_sae(arch, 24, 96, params)
    real = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
    optimizer = torch.optim.Adam(sae.parameters())
    for parameter in sae.parameters():  # in training every parameter gets a gradient
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    moments = sum(v.numel() * v.element_size() for state in optimizer.state.values()
                  for v in state.values() if v.dim() > 0)
    stored, trained = budget.tensor_bytes(arch, 96, 24, params)
    assert stored == real
    assert budget.checkpoint_bytes(stored, trained, 96, 0.0) == real + moments + 8 * 96


def test_activation_bytes_equal_a_real_extraction(tmp_path, tiny_model, tiny_corpus, monkeypatch, one_thread) -> None:
    monkeypatch.chdir(tmp_path)
    config = tiny(tiny_model, tiny_corpus, **{"activations.train_tokens": 2500, "activations.shard_tokens": 700,
                                             "activations.storage_dtype": "float16"})
    prepare_corpus(config["corpus"], Path(corpus_dir(config)))
    settings = extraction_settings(config, "train", device="cpu")
    extract(settings)
    manifest = __import__("json").loads((Path(settings.output_dirs["resid2"]) / "manifest.json").read_text())
    planned = budget.activation_footprint(config, "train", 32)
    assert manifest["tokens"] == planned["tokens"]
    on_disk = sum(shard["bytes"] for shard in manifest["shards"])
    # the HDF5 headers and attributes of each shard come on top (a few KiB each)
    assert planned["bytes"] <= on_disk <= planned["bytes"] + 16_384 * len(manifest["shards"])


def test_jobs_per_rule_equal_snakemakes_dry_run(tmp_path, tiny_model, tiny_corpus) -> None:
    raw = tiny_config(tiny_model, tiny_corpus, **{"sweep.archs": {"relu": {"l1_coef": [0.1]}},
                                                   "activations.sites": ["resid1", "resid2"]})
    write_config(tmp_path / "config.yaml", raw)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(tmp_path / "config.yaml"), "--cores", "1", "-n"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    block = result.stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    stats = Counter({line.split()[0]: int(line.split()[1]) for line in block.splitlines()[3:]
                     if len(line.split()) == 2 and line.split()[0] != "total"})
    jobs = budget.jobs_per_rule(validate_config(raw))
    assert jobs == dict(stats)
    # every evaluation job asks for the memory budget.evaluate_mem_mb gives its cell
    asked = {block.split("wildcards: ", 1)[1].split("\n", 1)[0]: int(block.split("mem_mb=", 1)[1].split(",", 1)[0])
             for block in result.stdout.split("rule evaluate_cell:")[1:]}
    assert len(asked) == 12 and all(
        mem == budget.evaluate_mem_mb(validate_config(raw), 32, int(cell.split("-n")[1].split("-")[0]))
        for cell, mem in asked.items())
    assert jobs["train_cell"] == 2 * 6  # 2 sites × (4 TopK + 2 ReLU cells)


def test_hidden_size_key_and_a_disagreeing_model_folder(tiny_model, tiny_corpus) -> None:
    config = tiny(tiny_model, tiny_corpus, **{"model.hidden_size": 768})
    assert budget.model_width(config) == (768, "model.hidden_size")
    with pytest.raises(UserError, match=r"config key model\.hidden_size: 768, but .*config\.json says hidden_size 32"):
        check_against_model_folder(config)
    elsewhere = tiny(Path("no/such/model"), tiny_corpus)
    assert budget.model_width(elsewhere) == (budget.DEFAULT_WIDTH, "assumed (set model.hidden_size)")


def test_cli_prints_the_plan_and_names_a_bad_key(tmp_path, tiny_model, tiny_corpus, capsys) -> None:
    good = write_config(tmp_path / "good.yaml", tiny_config(tiny_model, tiny_corpus))
    assert main(["plan", str(good)]) == 0
    out = capsys.readouterr().out
    assert "train_cell" in out and "topk-n256-k16-s0" in out and "d = 32" in out
    bad = write_config(tmp_path / "bad.yaml", tiny_config(tiny_model, tiny_corpus, **{"sweep.k": [4, 300]}))
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saesweep plan: error: config key sweep.k") and "Traceback" not in err


def test_the_workflow_reads_its_config_without_torch() -> None:
    """What the Snakefile imports at every start (and every cluster job's start) leaves torch,
    transformers and pandas unimported: they take seconds to load."""
    code = ("import sys, saesweep.plan.budget, saesweep.plan.cells, saesweep.plan.config, saesweep.plan.settings; "
            "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_registered_architecture_is_its_declaration() -> None:
    from saesweep.sae.catalog import DECLARATIONS

    assert list(ARCHITECTURES) == list(DECLARATIONS)
    for name, cls in ARCHITECTURES.items():
        declared = DECLARATIONS[name]
        assert (cls.name, cls.arch_parameters, cls.uses_auxk) == (declared.name, declared.parameters, declared.uses_auxk)
        assert cls.all_arch_parameters() == declared.all_parameters()
