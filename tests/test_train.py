"""Training one cell: the loss falls, divergence is an error without outputs, a killed or
terminated run resumes to the same weights and log, AuxK only acts once latents die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import CPU, TIMING_COLUMNS, assert_same_training, read_log, tiny_config
from saesweep.data.activations import ActivationStore, extract
from saesweep.cli import main as cli_main
from saesweep.plan.config import validate_config
from saesweep.data.corpus import prepare_corpus
from saesweep.data.loader import whole_batches_end
from saesweep.core.errors import UserError
from saesweep.sae.export import load_sae
from saesweep.core.files import read_json, write_json
from saesweep.core.job_settings import TrainSettings, to_json
from saesweep.plan.settings import activation_dir, corpus_dir, extraction_settings, train_settings
from saesweep.train.convergence import stop_index
from saesweep.train.launch import train_cell
from saesweep.train.schedule import heldout_points
from saesweep.train.trainer import CHECKPOINT, TrainingDiverged



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_model, tiny_corpus) -> tuple[Path, Path, Path]:
    """The tiny config's training activations (resid2, about 6000 tokens) and held-out ones,
    extracted once."""
    folder = tmp_path_factory.mktemp("train-data")
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        torch.set_num_threads(1)
        config = validate_config(tiny_config(tiny_model, tiny_corpus))
        prepare_corpus(config["corpus"], Path(corpus_dir(config)))
        for split in ("train", "eval"):
            extract(extraction_settings(config, split, device="cpu"))
    torch.set_num_threads(before)
    return folder, tiny_model, tiny_corpus


def cell_settings(extracted, cell: str, **overrides) -> TrainSettings:
    """``train_settings`` of a tiny-config cell, the activations folders made absolute."""
    folder, model, corpus = extracted
    config = validate_config(tiny_config(model, corpus, **overrides))
    settings = train_settings(config, "resid2", cell)
    heldout = replace(settings.heldout, activations=str(folder / activation_dir(config, "resid2", "eval")))
    return replace(settings, activations=str(folder / activation_dir(config, "resid2", "train")), heldout=heldout)


def test_loss_falls_and_outputs_are_complete(extracted, tmp_path) -> None:
    settings = cell_settings(extracted, "topk-n64-k4-s0", **{"train.log_every_tokens": 256})
    assert settings.tokens == 12000
    train_cell(settings, tmp_path / "cell", threads=1)
    log = read_log(tmp_path / "cell")
    # 12000 tokens hold 46 whole batches of 256: the last 224 tokens are dropped
    assert log.tokens.iloc[-1] == 11776 and log.tokens.is_monotonic_increasing
    assert (log.tokens == 256 * log.step).all()  # every logged step is a whole batch
    assert log.nmse.tail(5).mean() < 0.75 * log.nmse.iloc[0], log.nmse.tolist()
    assert (tmp_path / "cell" / "sae.safetensors").exists() and not (tmp_path / "cell" / CHECKPOINT).exists()
    sae, cfg = load_sae(tmp_path / "cell", CPU)
    assert (cfg["arch"], cfg["d"], cfg["n_latents"], cfg["params"]["k"]) == ("topk", 32, 64, 4)
    assert cfg["training"]["tokens"] == 11776 and cfg["training"]["steps"] == 12000 // 256
    store = ActivationStore(settings.activations)
    assert torch.equal(sae.act_mean, store.mean) and sae.act_scale.item() == pytest.approx(store.scale)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    # the trained SAE reconstructs raw activations better than their mean does
    raw = store.head(2000, CPU)
    x = sae.normalise(raw)
    with torch.no_grad():
        nmse = (x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert nmse < 0.75 and nmse == pytest.approx(log.nmse.tail(5).mean(), abs=0.15)
    # the held-out curve: one value after step ⌈46^(j/7)⌉, j = 0 … 7
    curve = log[log.heldout_nmse.notna()]
    assert curve.tokens.tolist() == [256 * s for s in (1, 2, 3, 6, 9, 16, 27, 46)]
    assert curve.heldout_nmse.iloc[-1] < 0.75 * curve.heldout_nmse.iloc[0]
    heldout = sae.normalise(ActivationStore(settings.heldout.activations).head(settings.heldout.tokens, CPU))
    with torch.no_grad():
        expected = (heldout - sae(heldout)).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum()
    assert curve.heldout_nmse.iloc[-1] == pytest.approx(expected.item(), rel=1e-5)
    # beside it, the latents that never fire on those tokens and the firings a latent at the
    # uniform rate L0 / n would have there and in the dead window
    with torch.no_grad():
        codes = sae.encode(heldout).to_dense()
    never = (codes <= settings.dead.threshold).all(dim=0).float().mean().item()
    rate = (codes > 0).sum().item() / len(heldout) / 64
    final = curve.iloc[-1]
    assert final.heldout_dead_fraction == pytest.approx(never)
    assert final.heldout_expected_firings == pytest.approx(len(heldout) * rate)
    assert final.window_expected_firings == pytest.approx(settings.dead.window_tokens * rate)
    assert log.heldout_dead_fraction.notna().sum() == len(curve)
    assert final.heldout_l0 == pytest.approx(rate * 64)
    # compute and time: the first row is one step of TopK without dead latents (E + P + 8·d·B·k),
    # every later step adds at least as much; train_seconds leaves out the held-out evaluations
    assert log.flops.iloc[0] == 2 * 256 * 32 * 64 + 2 * 64 * 32 + 8 * 32 * 256 * 4
    assert (log.flops.diff().iloc[1:] >= log.step.diff().iloc[1:] * log.flops.iloc[0]).all()
    assert log.train_seconds.is_monotonic_increasing and cfg["training"]["flops"] == log.flops.iloc[-1]
    assert 0 < cfg["training"]["train_seconds"] < cfg["training"]["wall_time_s"]


def test_nan_loss_stops_without_outputs(extracted, tmp_path) -> None:
    settings = cell_settings(extracted, "topk-n64-k4-s0", **{"train.lr.base": 1e30})
    with pytest.raises(TrainingDiverged) as caught:
        train_cell(settings, tmp_path / "cell", threads=1)
    assert isinstance(caught.value, UserError)
    message = str(caught.value)
    assert "loss" in message and ("nan" in message or "inf" in message) and "train.lr.base" in message
    assert not (tmp_path / "cell" / "sae.safetensors").exists()
    assert not (tmp_path / "cell" / "cfg.json").exists()
    # the command line reports it in one line with exit code 2
    write_json(tmp_path / "settings.json", to_json(settings))
    code = cli_main(["train", "--settings", str(tmp_path / "settings.json"), "--out", str(tmp_path / "cli"),
                     "--threads", "1"])
    assert code == 2
    assert not (tmp_path / "cli" / "sae.safetensors").exists()


# A cell long enough to be stopped after its first checkpoint (about 120 steps).
LONG = {"train.tokens.base": 30000, "train.checkpoint_every_tokens": 2560}
LONG_CELL = "topk-n1024-k8-s3"


@pytest.fixture(scope="module")
def uninterrupted(extracted, tmp_path_factory) -> tuple[Path, TrainSettings]:
    settings = cell_settings(extracted, LONG_CELL, **LONG)
    folder = tmp_path_factory.mktemp("uninterrupted") / "cell"
    before = torch.get_num_threads()
    train_cell(settings, folder, threads=1)
    torch.set_num_threads(before)
    return folder, settings


def start_training(settings: TrainSettings, folder: Path) -> tuple[subprocess.Popen, list[str]]:
    folder.mkdir(parents=True)
    write_json(folder.parent / "settings.json", to_json(settings))
    command = [sys.executable, "-m", "saesweep.cli", "train", "--settings", str(folder.parent / "settings.json"),
               "--out", str(folder), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), command


def wait_for_checkpoint(process: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 120
    while not (folder / CHECKPOINT).exists():
        assert process.poll() is None, f"training ended before its first checkpoint: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.002)


def finish(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_killed_training_resumes_to_the_same_weights(uninterrupted, tmp_path) -> None:
    reference, settings = uninterrupted
    folder = tmp_path / "cell"
    process, command = start_training(settings, folder)
    wait_for_checkpoint(process, folder)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (folder / "sae.safetensors").exists(), "the kill came too late: training had finished"
    checkpoint = torch.load(folder / CHECKPOINT, weights_only=False)
    assert 0 < checkpoint["tokens_seen"] < settings.tokens
    rerun = finish(command)
    assert "resuming from" in rerun.stderr
    assert not (folder / CHECKPOINT).exists()
    assert_same_training(folder, reference)


def test_sigterm_writes_a_checkpoint_and_exits_143(uninterrupted, tmp_path, capsys) -> None:
    reference, settings = uninterrupted
    folder = tmp_path / "cell"
    process, command = start_training(settings, folder)
    wait_for_checkpoint(process, folder)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "SIGTERM" in stderr
    assert (folder / CHECKPOINT).exists() and not (folder / "sae.safetensors").exists()
    stopped_at = torch.load(folder / CHECKPOINT, weights_only=False)["tokens_seen"]
    assert 0 < stopped_at < settings.tokens
    train_cell(settings, folder, threads=1)  # resume in this process (the kill test reruns the command)
    assert f"at {stopped_at} tokens" in capsys.readouterr().err
    assert_same_training(folder, reference)


def test_checkpoint_of_other_settings_is_ignored(extracted, tmp_path, capsys) -> None:
    from saesweep.train.trainer import Trainer

    fresh = cell_settings(extracted, "topk-n64-k4-s0")
    other = cell_settings(extracted, "topk-n64-k4-s0", **{"train.lr.base": 1e-3})
    planted = Trainer(other, tmp_path / "cell")  # a checkpoint left by a run of other settings
    planted.tokens_seen = 5120
    planted.save_checkpoint()
    train_cell(fresh, tmp_path / "cell", threads=1)
    assert "other settings" in capsys.readouterr().err
    train_cell(fresh, tmp_path / "clean", threads=1)
    assert_same_training(tmp_path / "cell", tmp_path / "clean")


def test_auxk_acts_only_on_dead_latents(extracted, tmp_path) -> None:
    """n = 512, k = 2 on ~6000 tokens with a 1000-token dead window: latents die. AuxK
    changes nothing until the first latent dies; from then on its loss is positive and falls.

    Not asserted: that AuxK ends with fewer dead latents. At this scale it ends with more
    (0.43 vs 0.29 here; the same on every small setting tried, also with the dense reference
    step): the dead latents AuxK selects have positive pre-activations larger than their
    projection on the residual, so its encoder gradient lowers them."""
    overrides = {"train.dead.min_tokens": 1000, "train.dead.factor": 1, "train.log_every_tokens": 256}
    logs, dead = {}, {}
    for enabled in (True, False):
        cell = "topk-n512-k2-ka16-s0" if enabled else "topk-n512-k2-ax0-ka16-s0"  # ax0: α = 0, AuxK off
        settings = cell_settings(extracted, cell, **overrides)
        train_cell(settings, tmp_path / str(enabled), threads=1)
        logs[enabled] = read_log(tmp_path / str(enabled)).drop(columns=TIMING_COLUMNS)
        dead[enabled] = read_json(tmp_path / str(enabled) / "cfg.json", "cfg")["training"]["final_dead_fraction"]
    on, off = logs[True], logs[False]
    assert dead[True] > 0.05 and dead[False] > 0.05  # the setting does kill latents
    assert (off.aux_loss == 0).all()
    first_dead = int((on.dead_fraction > 0).to_numpy().argmax())
    assert 0 < first_dead < len(on) - 10
    # rows up to the step whose end first shows a dead latent are identical
    pd.testing.assert_frame_equal(on.iloc[: first_dead + 1], off.iloc[: first_dead + 1])
    assert (on.aux_loss.iloc[: first_dead + 1] == 0).all()
    assert (on.aux_loss.iloc[first_dead + 1 :] > 0).all()
    assert not on.nmse.iloc[first_dead + 1 :].equals(off.nmse.iloc[first_dead + 1 :])
    after = on.aux_loss.iloc[first_dead + 1 :]
    assert after.tail(5).mean() < 0.95 * after.head(5).mean(), after.tolist()  # 0.70 at seed 0, 0.89 at seed 1


def train_from_cli(settings: TrainSettings, folder: Path, capsys) -> tuple[int, list[str]]:
    """``saesweep train`` of ``settings`` into ``folder``: its exit code and stderr lines."""
    write_json(folder.parent / "settings.json", to_json(settings))
    capsys.readouterr()
    code = cli_main(["train", "--settings", str(folder.parent / "settings.json"), "--out", str(folder), "--threads", "1"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a checkpoint"])
def test_a_damaged_checkpoint_is_refused_by_name(damage, extracted, tmp_path, capsys) -> None:
    """Checkpoints are written atomically, so one that cannot be read was damaged on disk:
    ``saesweep train`` stops in one line naming it and how to delete it, trains nothing and
    leaves the file for inspection."""
    from saesweep.train.trainer import Trainer

    settings = cell_settings(extracted, "topk-n64-k4-s0")
    folder = tmp_path / "cell"
    planted = Trainer(settings, folder)
    planted.tokens_seen = 5120
    planted.save_checkpoint()
    path = folder / CHECKPOINT
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-1000])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    code, lines = train_from_cli(settings, folder, capsys)
    assert code == 2 and len(lines) == 1, lines
    reason = "has no settings_hash" if damage == "not a checkpoint" else "cannot be read"
    assert lines[0].startswith(f"saesweep train: error: checkpoint {path} {reason}"), lines
    assert f"rm {folder}/checkpoint*.pt" in lines[0]
    assert path.exists() and not (folder / "sae.safetensors").exists() and not (folder / "train_log.parquet").exists()


def test_a_checkpoint_of_another_width_is_ignored(extracted, tmp_path, capsys) -> None:
    """A checkpoint of the same settings whose SAE has other shapes (the activations under the
    same folder extracted again at another width: here d = 48 for 32) is ignored with one line
    naming it and the difference, and the cell trains from the start."""
    from saesweep.train.trainer import Trainer

    settings = cell_settings(extracted, "topk-n64-k4-s0")
    planted = Trainer(settings, tmp_path / "cell")
    planted.tokens_seen = 5120
    planted.save_checkpoint()
    state = torch.load(tmp_path / "cell" / CHECKPOINT, weights_only=False)
    state["sae"] = {name: value.new_zeros([48 if size == 32 else size for size in value.shape])
                    for name, value in state["sae"].items()}
    torch.save(state, tmp_path / "cell" / CHECKPOINT)
    code, lines = train_from_cli(settings, tmp_path / "cell", capsys)
    assert code == 0, lines
    ignored = [line for line in lines if line.startswith("ignoring")]
    assert ignored == [f"ignoring checkpoint {tmp_path / 'cell' / CHECKPOINT}: its SAE is not this cell's "
                       "(W_enc has shape (64, 48), not (64, 32)): made from other activations"]
    train_cell(settings, tmp_path / "clean")
    assert_same_training(tmp_path / "cell", tmp_path / "clean")


def converge_settings(extracted, **budget) -> TrainSettings:
    """The tiny LONG cell with ``train.budget`` converge (cap 30000 tokens, 2 held-out points per
    doubling over 7 doublings)."""
    overrides = {f"train.budget.{key}": value for key, value in budget.items()}
    return cell_settings(extracted, LONG_CELL, **LONG, **{"train.budget.mode": "converge", "train.heldout.points": 8},
                         **overrides)


def measured_points(settings: TrainSettings) -> list[int]:
    """The tokens of the held-out points: after the first step (of ``batch_size`` tokens, the
    last one cut at the budget) at or past each of ``heldout_points``."""
    batch = settings.batch_size
    return sorted({min(-(-point // batch) * batch, settings.tokens) for point in heldout_points(settings)})


def test_convergence_ends_a_cell_at_the_point_its_criterion_names(extracted, tmp_path) -> None:
    settings = converge_settings(extracted, eps=0.1)
    train_cell(settings, tmp_path / "cell", threads=1)
    log = read_log(tmp_path / "cell")
    curve = log[log.heldout_nmse.notna()]
    # the held-out points: the first step at or past each of the grid's 2 points per doubling
    expected = measured_points(settings)
    assert curve.tokens.tolist() == expected[: len(curve)] and len(expected) > len(curve)
    index, done = stop_index(curve.tokens.tolist(), curve.heldout_nmse.tolist(), settings.convergence, settings.tokens)
    # it ended at the criterion's first point, not after it, and well before the cap
    assert done and index == len(curve) - 1 and log.tokens.iloc[-1] == curve.tokens.iloc[-1] < settings.tokens / 2
    training = load_sae(tmp_path / "cell", CPU)[1]["training"]
    assert training["budget"] == "converge" and training["converged"] is True
    assert training["tokens_to_converge"] == training["tokens"] == curve.tokens.iloc[-1]
    # a mid-run point under a constant rate is a run of its own: a fixed budget of the tokens the
    # converged cell took ends with the same weights
    shorter = cell_settings(extracted, LONG_CELL, **{**LONG, "train.tokens.base": int(curve.tokens.iloc[-1])})
    assert shorter.convergence is None and shorter.decay == "none"
    train_cell(shorter, tmp_path / "fixed", threads=1)
    converged_sae, fixed_sae = load_sae(tmp_path / "cell", CPU)[0], load_sae(tmp_path / "fixed", CPU)[0]
    assert all(torch.equal(a, b) for a, b in zip(converged_sae.state_dict().values(), fixed_sae.state_dict().values()))
    assert load_sae(tmp_path / "fixed", CPU)[1]["training"]["converged"] is None


def test_the_cap_ends_a_cell_that_has_not_converged(extracted, tmp_path) -> None:
    settings = converge_settings(extracted, min_tokens=10**9)  # the criterion can never hold
    train_cell(settings, tmp_path / "cell", threads=1)
    log = read_log(tmp_path / "cell")
    end = whole_batches_end(0, settings.tokens, settings.batch_size)  # the cap's whole batches
    assert log.tokens.iloc[-1] == end
    assert log[log.heldout_nmse.notna()].tokens.tolist() == measured_points(settings)
    assert log[log.heldout_nmse.notna()].tokens.iloc[-1] == end
    training = load_sae(tmp_path / "cell", CPU)[1]["training"]
    assert (training["converged"], training["tokens_to_converge"], training["tokens"]) == (False, None, end)
