"""Extraction: stored activations equal a direct forward's at each site, the manifest's
statistics equal those of the stored rows, the forward stops at the deepest site, damaged
shards are refused, a killed extraction resumes to the same bytes, and an extraction split
over jobs writes the files of one job."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import saesweep.data.activations as activations_module
from saesweep.data.activations import HASHED
from conftest import CPU, make_text, tiny_config
from saesweep.data.activations import ActivationStore, extract, extract_part, write_manifests
from saesweep.plan.config import validate_config
from saesweep.data.corpus import prepare_corpus
from saesweep.core.errors import UserError
from saesweep.core.files import read_json, sha256_file, write_json
from saesweep.core.job_settings import to_json
from saesweep.data.lm import decoder_blocks
from saesweep.plan.settings import corpus_dir, extraction_settings


pytestmark = pytest.mark.usefixtures("one_thread")


def prepared(tmp_path: Path, model: Path, corpus: Path, monkeypatch, **overrides) -> dict:
    """A validated tiny config whose relative paths resolve inside ``tmp_path``, corpus prepared."""
    monkeypatch.chdir(tmp_path)
    config = validate_config(tiny_config(model, corpus, **overrides))
    prepare_corpus(config["corpus"], Path(corpus_dir(config)))
    return config


def load_reference(model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def direct_forward(lm, windows: np.ndarray) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """HF hidden states of a plain full forward, and module outputs caught by hooks."""
    blocks = decoder_blocks(lm)
    caught: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            caught[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[3].register_forward_hook(keep("block3")),
               blocks[2].mlp.register_forward_hook(keep("mlp2")),
               blocks[0].self_attn.register_forward_hook(keep("attn0"))]
    try:
        with torch.no_grad():
            out = lm(input_ids=torch.from_numpy(windows).long(), output_hidden_states=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return out.hidden_states, caught


def kept_rows(values: torch.Tensor, skip: int) -> np.ndarray:
    """(w, context, d) → rows of the kept positions in window order, (w · (context − skip), d)."""
    return values[:, skip:].flatten(0, 1).numpy()


def test_sites_equal_a_direct_forward(tmp_path, tiny_model, tiny_corpus, monkeypatch) -> None:
    config = prepared(tmp_path, tiny_model, tiny_corpus, monkeypatch, **{
        "activations.sites": ["resid1", "resid3", "mlp2", "attn0"], "activations.skip_positions": 3,
        "activations.train_tokens": 2000, "activations.shard_tokens": 600})
    settings = extraction_settings(config, "train", device="cpu")
    extract(settings)
    skip, kept = 3, 32 - 3
    lm = load_reference(tiny_model)
    stores = {site: ActivationStore(folder) for site, folder in settings.output_dirs.items()}
    n_shards = len(stores["resid1"].shards)
    assert n_shards >= 3
    for site, store in stores.items():
        assert store.d == 32 and len(store.shards) == n_shards
        assert store.tokens == sum(s.tokens for s in store.shards) >= 2000
        assert store.tokens == kept * -(-2000 // kept)  # whole windows: ceil(2000 / kept)
    for index in range(n_shards):
        windows = stores["resid1"].read_windows(index)
        assert windows.shape[1] == 32
        for store in stores.values():  # every site's shard holds the same windows
            np.testing.assert_array_equal(store.read_windows(index), windows)
        hidden, caught = direct_forward(lm, windows)
        expected = {
            "resid1": kept_rows(hidden[2], skip),
            "resid3": kept_rows(caught["block3"], skip),  # hidden_states[4] is after the final norm
            "mlp2": kept_rows(caught["mlp2"], skip),
            "attn0": kept_rows(caught["attn0"], skip),
        }
        for site, store in stores.items():
            rows = store.read(index)
            assert rows.dtype == np.float32
            assert rows.shape == (len(windows) * kept, 32)
            np.testing.assert_allclose(rows, expected[site], rtol=1e-5, atol=1e-5, err_msg=f"{site} shard {index}")
    # the sites really differ (a hook on the wrong module would make some equal)
    first = {site: store.read(0) for site, store in stores.items()}
    for a in first:
        for b in first:
            if a < b:
                assert not np.allclose(first[a], first[b], atol=1e-3), (a, b)
    # windows in the shards are the corpus's first windows in order
    all_windows = np.concatenate([stores["resid1"].read_windows(i) for i in range(n_shards)])
    assert len(np.unique(all_windows, axis=0)) == len(all_windows)


def test_float16_default_and_the_forward_stops_at_the_deepest_site(tmp_path, tiny_model, tiny_corpus, monkeypatch) -> None:
    raw_overrides = {"activations.sites": ["resid1", "mlp2"], "activations.train_tokens": 1200,
                     "activations.shard_tokens": 400}
    monkeypatch.chdir(tmp_path)
    raw = tiny_config(tiny_model, tiny_corpus, **raw_overrides)
    del raw["activations"]["storage_dtype"]
    config = validate_config(raw)
    prepare_corpus(config["corpus"], Path(corpus_dir(config)))
    calls = {"block": [0, 0, 0, 0], "norm": 0, "head": 0}
    real_load_lm = activations_module.load_lm

    def counting_load_lm(model, device):
        lm, tokenizer = real_load_lm(model, device)
        for index, block in enumerate(decoder_blocks(lm)):
            block.register_forward_hook(lambda *_a, i=index: calls["block"].__setitem__(i, calls["block"][i] + 1))
        lm.model.norm.register_forward_hook(lambda *_a: calls.__setitem__("norm", calls["norm"] + 1))
        lm.lm_head.register_forward_hook(lambda *_a: calls.__setitem__("head", calls["head"] + 1))
        return lm, tokenizer

    monkeypatch.setattr(activations_module, "load_lm", counting_load_lm)
    settings = extraction_settings(config, "train", device="cpu")
    extract(settings)
    forwards = calls["block"][0]
    assert forwards >= 2
    assert calls["block"][1] == calls["block"][2] == forwards
    assert calls["block"][3] == 0 and calls["norm"] == 0 and calls["head"] == 0, calls

    lm = load_reference(tiny_model)
    for site in ("resid1", "mlp2"):
        store = ActivationStore(settings.output_dirs[site])
        assert store.manifest["storage_dtype"] == "float16" and store.manifest["skip_positions"] == 1
        for index in range(len(store.shards)):
            rows = store.read(index)
            assert rows.dtype == np.float16
            hidden, caught = direct_forward(lm, store.read_windows(index))
            expected = kept_rows(hidden[2] if site == "resid1" else caught["mlp2"], 1)
            np.testing.assert_allclose(rows.astype(np.float32), expected, rtol=2e-3, atol=1e-4)


def test_manifest_lists_shards_and_statistics_of_the_stored_rows(tmp_path, tiny_model, tiny_corpus, monkeypatch) -> None:
    config = prepared(tmp_path, tiny_model, tiny_corpus, monkeypatch, **{
        "activations.train_tokens": 2500, "activations.shard_tokens": 700, "activations.storage_dtype": "float16"})
    settings = extraction_settings(config, "train", device="cpu")
    extract(settings)
    folder = Path(settings.output_dirs["resid2"])
    manifest = read_json(folder / "manifest.json", "manifest")
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.h5" for i in range(len(manifest["shards"]))]
    assert sorted(p.name for p in folder.glob("shard-*.h5")) == [s["file"] for s in manifest["shards"]]
    assert len(manifest["shards"]) >= 3
    rows = []
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        assert shard["bytes"] == path.stat().st_size
        assert shard["sha256"] == sha256_file(path)
        with h5py.File(path) as handle:
            data = handle["activations"][...]
            assert shard["tokens"] == len(data) == handle["windows"].shape[0] * (32 - 1)
            assert handle.attrs["site"] == "resid2"
        rows.append(data)
    rows = np.concatenate(rows).astype(np.float64)
    assert manifest["tokens"] == len(rows) and manifest["d"] == rows.shape[1] == 32
    mean = rows.mean(axis=0)
    mean_squared_norm = float(np.square(rows - mean).sum(axis=1).mean())
    np.testing.assert_allclose(manifest["mean"], mean, rtol=1e-9, atol=1e-9)
    assert manifest["mean_squared_norm"] == pytest.approx(mean_squared_norm, rel=1e-7)
    assert manifest["scale"] == pytest.approx(np.sqrt(mean_squared_norm / 32), rel=1e-7)
    assert manifest["provenance"]["settings_hash"] == manifest["settings_hash"]
    store = ActivationStore(folder)
    np.testing.assert_allclose(((store.head(len(rows), CPU).double() - store.mean.double()) / store.scale).pow(2).sum(1).mean(),
                               32.0, rtol=1e-5)


def test_an_unchanged_shard_is_hashed_once_by_the_manifest(tmp_path, tiny_model, tiny_corpus, monkeypatch) -> None:
    """Opening a folder hashes no shard whose size and modification time are those the
    manifest recorded when it hashed it; a shard touched since is hashed (and found intact)."""
    config = prepared(tmp_path, tiny_model, tiny_corpus, monkeypatch, **{
        "activations.train_tokens": 1500, "activations.shard_tokens": 500})
    settings = extraction_settings(config, "train", device="cpu")
    extract(settings)
    folder = Path(settings.output_dirs["resid2"])
    hashed = []
    monkeypatch.setattr(activations_module, "sha256_file", lambda path: hashed.append(path.name) or sha256_file(path))
    store = ActivationStore(folder)
    assert hashed == [] and len(store.shards) >= 3
    touched = folder / "shard-00001.h5"
    status = touched.stat()
    os.utime(touched, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    ActivationStore(folder)
    assert hashed == ["shard-00001.h5"]


def test_damaged_shards_are_refused_by_name(tmp_path, tiny_model, tiny_corpus, monkeypatch) -> None:
    config = prepared(tmp_path, tiny_model, tiny_corpus, monkeypatch, **{
        "activations.train_tokens": 1500, "activations.shard_tokens": 500})
    settings = extraction_settings(config, "train", device="cpu")
    extract(settings)
    folder = Path(settings.output_dirs["resid2"])
    ActivationStore(folder)  # intact: fine
    victim = folder / "shard-00001.h5"
    original = victim.read_bytes()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    written = victim.stat().st_mtime_ns
    victim.write_bytes(bytes(flipped))
    os.utime(victim, ns=(written, written + 10**9))  # rewritten later (whatever the clock's resolution)
    with pytest.raises(UserError, match="shard-00001.h5") as caught:
        ActivationStore(folder)
    assert "sha256" in str(caught.value)

    victim.write_bytes(original[:-100])
    with pytest.raises(UserError, match="shard-00001.h5") as caught:
        ActivationStore(folder)
    assert "truncated" in str(caught.value)

    victim.unlink()
    with pytest.raises(UserError, match="shard-00001.h5"):
        ActivationStore(folder)
    victim.write_bytes(original)
    ActivationStore(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json"):
        ActivationStore(folder)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("shard-*.h5"))}


def test_killed_extraction_resumes_to_identical_shards(tmp_path, tiny_model, monkeypatch) -> None:
    corpus = tmp_path / "big-corpus"
    corpus.mkdir()
    for index in range(12):
        (corpus / f"doc{index:02d}.txt").write_text(make_text(100 + index, 220))
    overrides = {"activations.sites": ["resid1", "mlp2"], "activations.train_tokens": 40000,
                 "activations.shard_tokens": 1600, "activations.batch_size": 4}

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    for workdir in (killed_dir, reference_dir):  # the same relative settings in both
        workdir.mkdir()
        config = prepared(workdir, tiny_model, corpus, monkeypatch, **overrides)
        settings = extraction_settings(config, "train", device="cpu")
        write_json(workdir / "extract.json", to_json(settings))
    extract(settings)  # uninterrupted, in reference_dir (the current folder)
    sites = {site: Path(folder) for site, folder in settings.output_dirs.items()}
    n_shards = len(read_json(reference_dir / sites["resid1"] / "manifest.json", "manifest")["shards"])
    assert n_shards >= 15

    command = [sys.executable, "-m", "saesweep.cli", "extract", "--settings", "extract.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=killed_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = killed_dir / sites["resid1"] / "shard-00000.h5"
    deadline = time.monotonic() + 180
    while not first.exists():
        assert process.poll() is None, f"extract ended before writing a shard: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no shard within 180 s"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    survivors = {}
    for site, folder in sites.items():
        folder = killed_dir / folder
        assert not (folder / "manifest.json").exists(), "the kill came too late: the extraction had finished"
        for path in folder.glob("shard-*.h5"):  # every file under a final name is a complete shard
            with h5py.File(path, "r") as handle:
                assert handle["activations"].shape[0] == handle.attrs["tokens"] > 0
            survivors[path] = path.stat().st_mtime_ns
        assert all(p.name.startswith(".") for p in folder.iterdir() if not p.name.startswith("shard-"))
    assert 0 < len(survivors) < 2 * n_shards

    monkeypatch.chdir(killed_dir)
    extract(settings)  # the rerun, here in-process (the same settings file's content)
    for path, mtime in survivors.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was rewritten instead of reused"
    for site, folder in sites.items():
        finished = shard_bytes(killed_dir / folder)
        expected = shard_bytes(reference_dir / folder)
        assert list(finished) == list(expected) and len(expected) == n_shards
        for name in expected:
            with h5py.File(killed_dir / folder / name) as a, h5py.File(reference_dir / folder / name) as b:
                np.testing.assert_array_equal(a["activations"][...], b["activations"][...])
                np.testing.assert_array_equal(a["windows"][...], b["windows"][...])
        assert finished == expected
        manifest = read_json(killed_dir / folder / "manifest.json", "manifest")
        reference = read_json(reference_dir / folder / "manifest.json", "manifest")
        assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
        assert manifest == reference
        ActivationStore(killed_dir / folder)


def folder_files(folder: Path) -> dict[str, bytes]:
    """The folder's files but ``HASHED`` (file times, not contents)."""
    assert (folder / HASHED).is_file()
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file() and path.name != HASHED}


@pytest.mark.parametrize("jobs, train_tokens", [(4, 9000), (3, 10**6), (25, 9000)])
def test_extraction_split_over_jobs_equals_one_job(tmp_path, tiny_model, tiny_corpus, monkeypatch, jobs, train_tokens) -> None:
    """J parts (run out of order, as a cluster may) then the manifests give the very files
    of one job: the same windows and activations in the same order, the same manifest.
    10⁶ tokens: the corpus ends inside an early part and later parts are empty; J = 25:
    more parts than shards."""
    overrides = {"activations.sites": ["resid1", "mlp2"], "activations.train_tokens": train_tokens,
                 "activations.shard_tokens": 1000, "activations.storage_dtype": "float16"}
    one_dir, split_dir = tmp_path / "one", tmp_path / "split"
    for workdir, extract_jobs in ((one_dir, 1), (split_dir, jobs)):
        workdir.mkdir()
        config = prepared(workdir, tiny_model, tiny_corpus, monkeypatch, **overrides, **{"activations.extract_jobs": extract_jobs})
        settings = extraction_settings(config, "train", device="cpu")
        assert len(settings.part_files) == extract_jobs
        if extract_jobs == 1:
            extract(settings)
            continue
        parts = list(range(jobs))
        random.Random(jobs).shuffle(parts)
        loaded = activations_module.load_lm(settings.model, CPU)
        for part in parts[:-1]:
            extract_part(settings, part, loaded)
        with pytest.raises(UserError, match=f"part-{parts[-1]:04d}.json"):
            write_manifests(settings)  # a part missing: no manifest
        assert not any((Path(folder) / "manifest.json").exists() for folder in settings.output_dirs.values())
        extract_part(settings, parts[-1], loaded)
        write_manifests(settings)

    records = [read_json(split_dir / path, "part") for path in settings.part_files]
    listed = [index for record in records for index in record["shards"]]
    assert listed == list(range(len(listed)))  # disjoint, in order, no gap
    if train_tokens > 10**5:
        assert records[-1]["shards"] == [] and records[0]["shards"]  # the corpus ended early
    if jobs > len(listed):
        assert sum(not record["shards"] for record in records) >= jobs - len(listed)
    for folder in settings.output_dirs.values():
        one, split = folder_files(one_dir / folder), folder_files(split_dir / folder)
        assert len(one) == len(listed) + 1 >= 4
        assert list(one) == list(split)
        for name in one:
            if name.endswith(".h5"):
                with h5py.File(one_dir / folder / name) as a, h5py.File(split_dir / folder / name) as b:
                    np.testing.assert_array_equal(a["windows"][...], b["windows"][...])
                    np.testing.assert_array_equal(a["activations"][...], b["activations"][...])
            assert one[name] == split[name], name
        assert read_json(one_dir / folder / "manifest.json", "m") == read_json(split_dir / folder / "manifest.json", "m")
        ActivationStore(split_dir / folder)


def test_part_records_are_checked(tmp_path, tiny_model, tiny_corpus, monkeypatch) -> None:
    config = prepared(tmp_path, tiny_model, tiny_corpus, monkeypatch, **{
        "activations.train_tokens": 3000, "activations.shard_tokens": 600, "activations.extract_jobs": 2})
    settings = extraction_settings(config, "train", device="cpu")
    with pytest.raises(UserError, match="extract_jobs is 2"):
        extract_part(settings, 2)
    extract(settings)
    record_path = Path(settings.part_files[1])
    record = read_json(record_path, "part")
    write_json(record_path, {**record, "shards": record["shards"][1:]})  # a gap
    with pytest.raises(UserError, match="part-0001.json"):
        write_manifests(settings)
    changed = replace(settings, skip_positions=2)  # records from other settings
    with pytest.raises(UserError, match="other settings"):
        write_manifests(changed)


def test_shards_of_another_corpus_are_extracted_again(tmp_path, tiny_model, tiny_corpus, monkeypatch) -> None:
    corpus = tmp_path / "text"
    corpus.mkdir()
    for path in tiny_corpus.glob("*.txt"):
        (corpus / path.name).write_text(path.read_text())
    config = prepared(tmp_path, tiny_model, corpus, monkeypatch, **{
        "activations.train_tokens": 1500, "activations.shard_tokens": 500})
    settings = extraction_settings(config, "train", device="cpu")
    extract(settings)
    folder = Path(settings.output_dirs["resid2"])
    before = shard_bytes(folder)
    for path in corpus.glob("*.txt"):  # the same names, other text: the same settings
        path.write_text(make_text(500 + int(path.stem[3:]), 110))
    prepare_corpus(config["corpus"], Path(corpus_dir(config)))
    extract(settings)
    after = shard_bytes(folder)
    assert list(after) == list(before) and all(after[name] != before[name] for name in before)
    fingerprint = read_json(Path(corpus_dir(config)) / "corpus.json", "corpus")["fingerprint"]
    assert ActivationStore(folder).manifest["corpus_fingerprint"] == fingerprint
