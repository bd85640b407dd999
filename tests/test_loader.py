"""The batch stream: seeded order, each token once per epoch, resumable at any batch
boundary, budget handling and normalisation. The shards are synthetic (written by the
extraction's own writer) with a row id in column 0, so every row can be traced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saesweep.data.activations import ActivationStore, shard_name, write_manifest, write_shard
from saesweep.core.errors import UserError
from saesweep.core.files import read_json, sha256_file, write_json
from saesweep.data.loader import BatchStream

SIZES = [300, 250, 310, 280, 90, 300, 200]  # unequal shards, 1730 rows
TOTAL = sum(SIZES)
D = 8
B = 64


def make_store(folder: Path, sizes=SIZES, dtype=np.float32) -> tuple[ActivationStore, np.ndarray]:
    """Shards of random rows whose column 0 is the row's global index."""
    rng = np.random.default_rng(123)
    attributes = {"model": "synthetic", "revision": "", "compute_dtype": "float32", "storage_dtype": np.dtype(dtype).name,
                  "context": 10, "skip_positions": 0, "corpus_fingerprint": "none", "code_version": "test",
                  "settings_hash": "synthetic", "site": "resid0"}
    folder.mkdir(parents=True, exist_ok=True)
    everything, start = [], 0
    for index, size in enumerate(sizes):
        rows = rng.normal(3.0, 2.0, (size, D))
        rows[:, 0] = np.arange(start, start + size)
        rows = rows.astype(dtype)
        write_shard(folder / shard_name(index), rows, torch.zeros((size + 9) // 10, 10, dtype=torch.long), attributes)
        everything.append(rows)
        start += size
    write_manifest(folder, len(sizes), attributes, {"synthetic": True})
    return ActivationStore(folder), np.concatenate(everything).astype(np.float64)


@pytest.fixture()
def store(tmp_path: Path) -> tuple[ActivationStore, np.ndarray]:
    return make_store(tmp_path / "acts")


def batches(store: ActivationStore, **options) -> list[torch.Tensor]:
    options = {"batch_size": B, "seed": 0, "budget": TOTAL, "device": torch.device("cpu"), **options}
    return list(BatchStream(store, **options))


def row_ids(batch: torch.Tensor, store: ActivationStore) -> np.ndarray:
    """Undo the normalisation of column 0 and read the row ids."""
    raw = batch[:, 0].double() * store.scale + float(store.mean[0])
    ids = np.rint(raw.numpy()).astype(np.int64)
    assert np.abs(raw.numpy() - ids).max() < 1e-2
    return ids


def all_ids(stream: list[torch.Tensor], store: ActivationStore) -> np.ndarray:
    return np.concatenate([row_ids(batch, store) for batch in stream])


def test_same_seed_same_batches_other_seed_other_order(store) -> None:
    store, _ = store
    first = batches(store, seed=5, budget=2 * TOTAL)
    second = batches(store, seed=5, budget=2 * TOTAL)
    assert len(first) == len(second) == 2 * TOTAL // B
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = batches(store, seed=6, budget=2 * TOTAL)
    ids, other_ids = all_ids(first, store), all_ids(other, store)
    assert sorted(ids[:TOTAL]) == sorted(other_ids[:TOTAL])
    assert (ids != other_ids).mean() > 0.9


def test_each_token_exactly_once_per_epoch(store) -> None:
    store, rows = store
    budget = 2 * TOTAL + TOTAL // 2
    stream = batches(store, seed=1, budget=budget)
    ids = all_ids(stream, store)
    assert len(ids) == budget // B * B
    for epoch in range(2):
        np.testing.assert_array_equal(np.sort(ids[epoch * TOTAL : (epoch + 1) * TOTAL]), np.arange(TOTAL))
    tail = ids[2 * TOTAL :]
    assert len(np.unique(tail)) == len(tail)
    # epochs are shuffled differently, and not in storage order
    assert (ids[:TOTAL] != ids[TOTAL : 2 * TOTAL]).mean() > 0.9
    assert (ids[:TOTAL] != np.arange(TOTAL)).mean() > 0.9
    # rows are shuffled across shards (a shuffle buffer), not shard by shard
    shard_of = np.searchsorted(np.cumsum(SIZES), ids[:B], side="right")
    assert len(set(shard_of.tolist())) >= 2
    # and the rows themselves come back intact (sorted by id)
    first_epoch = torch.cat(stream).double().numpy()[:TOTAL]
    restored = first_epoch * store.scale + store.mean.double().numpy()
    np.testing.assert_allclose(restored[np.argsort(ids[:TOTAL])], rows, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group_shards", [1, 2, 4])
@pytest.mark.parametrize("start_batches", [1, 5, 11, 27, 30, 40])
def test_stream_from_an_offset_equals_the_rest_of_the_stream(store, group_shards, start_batches) -> None:
    store, _ = store
    budget = 2 * TOTAL + 77
    full = batches(store, seed=3, budget=budget, group_shards=group_shards)
    start = start_batches * B  # 11 and 27 cross a group or epoch boundary for some group sizes
    resumed = batches(store, seed=3, budget=budget, start=start, group_shards=group_shards)
    assert len(resumed) == len(full) - start_batches
    for a, b in zip(resumed, full[start_batches:]):
        assert torch.equal(a, b)


def test_budget_beyond_the_tokens(store) -> None:
    store, _ = store
    with pytest.raises(UserError, match="on_exhausted"):
        BatchStream(store, B, 0, TOTAL + 1, device=torch.device("cpu"), on_exhausted="error")
    exact = batches(store, budget=TOTAL, on_exhausted="error")
    assert sum(len(b) for b in exact) == TOTAL // B * B
    for budget in (TOTAL + 1, 3 * TOTAL - 5, 100):
        assert sum(len(b) for b in batches(store, budget=budget, on_exhausted="cycle")) == budget // B * B


@pytest.mark.parametrize("budget", [B, 5 * B, 5 * B + 1, 5 * B + B - 1, TOTAL, 2 * TOTAL + 77])
@pytest.mark.parametrize("start_batches", [0, 3])
def test_every_batch_is_whole_and_the_remainder_is_dropped(store, budget, start_batches) -> None:
    """No batch is smaller than the batch size (a partial last batch is dropped), and the
    stream ends at the last whole batch within the budget, ``end``."""
    store, _ = store
    start = min(start_batches * B, budget // B * B)
    stream = BatchStream(store, B, 0, budget, device=torch.device("cpu"), start=start)
    sizes = [len(batch) for batch in stream]
    assert set(sizes) <= {B} and stream.end == budget // B * B == start + sum(sizes)


def test_a_budget_without_a_whole_batch_is_refused(store) -> None:
    store, _ = store
    with pytest.raises(UserError, match="no whole batch of 64.*train.batch_size"):
        BatchStream(store, B, 0, B - 1, device=torch.device("cpu"))


def test_normalisation(tmp_path: Path) -> None:
    store, rows = make_store(tmp_path / "f16", dtype=np.float16)
    mean, scale = rows.mean(axis=0), np.sqrt(np.square(rows - rows.mean(axis=0)).sum(axis=1).mean() / D)
    np.testing.assert_allclose(store.mean.numpy(), mean, rtol=1e-6)
    assert store.scale == pytest.approx(scale, rel=1e-9)
    stream = batches(store, seed=2, budget=TOTAL, batch_size=173)  # 10 whole batches: the epoch
    x = torch.cat(stream)
    assert x.dtype == torch.float32
    ids = np.concatenate([np.rint(b[:, 0].double().numpy() * scale + mean[0]).astype(int) for b in stream])
    expected = (rows[ids] - store.mean.double().numpy()) / store.scale
    np.testing.assert_allclose(x.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    # over an epoch: mean 0 and mean squared norm d
    np.testing.assert_allclose(x.double().mean(0).numpy(), 0, atol=1e-5)
    assert x.double().pow(2).sum(1).mean().item() == pytest.approx(D, rel=1e-5)


def test_read_failure_reaches_the_consumer(store) -> None:
    """A shard gone after the store was opened (and verified): the stream's reader thread
    hands the consumer a UserError naming the file."""
    store, _ = store
    Path(store.shards[3].path).unlink()
    with pytest.raises(UserError, match=f"activation shard {store.shards[3].path} is missing"):
        batches(store, budget=TOTAL)


def test_a_shard_damaged_after_opening_is_named(store) -> None:
    store, _ = store
    path = Path(store.shards[2].path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=f"activation shard {path} cannot be read .*truncated or corrupt"):
        batches(store, budget=TOTAL)


@pytest.mark.parametrize("change", ["dtype", "width", "rows"])
def test_a_shard_that_disagrees_with_its_manifest_is_named(tmp_path: Path, change: str) -> None:
    """Shard 2 rewritten with another dtype, width or number of rows and its manifest entry's
    size and sha256 updated to match (so opening passes): reading it names the file, its
    shape and dtype and the manifest's."""
    store, _ = make_store(tmp_path / "acts")
    path = Path(store.shards[2].path)
    rows = store.read(2)
    attributes = {"settings_hash": "synthetic", "site": "resid0"}
    rows = {"dtype": rows.astype(np.float16), "width": np.hstack([rows, rows[:, :1]]), "rows": rows[:-5]}[change]
    write_shard(path, rows, torch.zeros(31, 10, dtype=torch.long), attributes)
    manifest = read_json(tmp_path / "acts" / "manifest.json", "manifest")
    manifest["shards"][2].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    write_json(tmp_path / "acts" / "manifest.json", manifest)
    reopened = ActivationStore(tmp_path / "acts")
    with pytest.raises(UserError) as caught:
        batches(reopened, budget=TOTAL)
    message = str(caught.value)
    assert f"activation shard {path} holds activations of shape {rows.shape} and dtype {rows.dtype}" in message
    assert f"its manifest says ({SIZES[2]}, {D}) and float32" in message


@pytest.mark.parametrize("key", ["d", "storage_dtype"])
def test_a_manifest_without_a_key_is_named(tmp_path: Path, key: str) -> None:
    make_store(tmp_path / "acts")
    manifest = read_json(tmp_path / "acts" / "manifest.json", "manifest")
    del manifest[key]
    write_json(tmp_path / "acts" / "manifest.json", manifest)
    with pytest.raises(UserError, match=f"activation manifest {tmp_path / 'acts' / 'manifest.json'} has no key '{key}'"):
        ActivationStore(tmp_path / "acts")
