"""Each job's typed settings: read once from the JSON file the rule wrote, exactly as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from saesweep.cli import main as cli_main
from saesweep.core.errors import UserError
from saesweep.core.job_settings import EvalSettings, ExtractionSettings, TrainSettings, from_json, read_settings, to_json
from saesweep.plan.cells import sweep_cells
from saesweep.plan.config import load_config
from saesweep.plan.settings import eval_settings, extraction_settings, train_settings

SHIPPED = sorted((REPO / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_every_shipped_job_reads_back_as_written(path: Path) -> None:
    """The JSON a rule writes is what the job reads: ``to_json`` ∘ ``from_json`` is the identity
    on it, so the settings hashes of existing cells do not change."""
    config = load_config(path)
    built = [extraction_settings(config, split) for split in ("train", "eval")]
    for site in config["activations"]["sites"]:
        for cell in sweep_cells(config)[:6]:
            built += [train_settings(config, site, cell.name), eval_settings(config, site, cell.name)]
    for settings in built:
        written = json.loads(json.dumps(to_json(settings), sort_keys=True))
        read = from_json(type(settings), written, "file")
        assert to_json(read) == written and read == settings  # the job reads what the workflow planned


def default_train_json() -> dict:
    config = load_config(REPO / "config" / "config.yaml")
    return to_json(train_settings(config, config["activations"]["sites"][0], sweep_cells(config)[0].name))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {**s, "warmup_token": s.pop("warmup_tokens")}, "unknown key 'warmup_token'"),
        (lambda s: {key: value for key, value in s.items() if key != "lr"}, "missing key 'lr'"),
        (lambda s: {**s, "tokens": "12000"}, "key tokens: expected int, found '12000'"),
        (lambda s: {**s, "dead": {**s["dead"], "window": 3}}, "key dead: unknown key 'window'"),
        (lambda s: {**s, "autocast_bf16": 1}, "key autocast_bf16: expected bool"),
    ],
)
def test_a_wrong_key_stops_the_job_where_the_file_is_read(tmp_path, capsys, change, message) -> None:
    path = tmp_path / "train_settings.json"
    path.write_text(json.dumps(change(default_train_json())))
    with pytest.raises(UserError, match=str(path)) as caught:
        read_settings(path, TrainSettings)
    assert message in str(caught.value)
    # the command line: one line, exit 2, nothing written
    code = cli_main(["train", "--settings", str(path), "--out", str(tmp_path / "cell")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "cell").exists()


def test_integers_are_accepted_where_floats_are_meant_and_booleans_are_not() -> None:
    settings = default_train_json()
    assert from_json(TrainSettings, {**settings, "lr": 1}, "file").lr == 1
    with pytest.raises(UserError, match="key lr: expected float"):
        from_json(TrainSettings, {**settings, "lr": True}, "file")


def test_an_absent_optional_block_stays_absent() -> None:
    """A one-process cell has no ``distributed`` key; a distributed one keeps it."""
    settings = default_train_json()
    assert "distributed" not in settings and from_json(TrainSettings, settings, "f").distributed is None
    spread = {**settings, "distributed": {"data_parallel": 2, "latent_shards": 1, "timeout_s": 60}}
    assert to_json(from_json(TrainSettings, spread, "f")) == spread


def test_evaluation_follows_the_training_device_unless_it_has_its_own(tiny_model, tiny_corpus) -> None:
    from conftest import tiny_config
    from saesweep.plan.config import validate_config

    config = validate_config(tiny_config(tiny_model, tiny_corpus, **{"train.device": "cpu"}))
    cell = sweep_cells(config)[0].name
    assert eval_settings(config, "resid2", cell).device == "cpu"
    own = validate_config(tiny_config(tiny_model, tiny_corpus, **{"train.device": "cuda", "evaluate.device": "cpu"}))
    assert eval_settings(own, "resid2", cell).device == "cpu" and train_settings(own, "resid2", cell).device == "cuda"
    # the device is not also spread among the evaluation's sizes
    assert set(to_json(eval_settings(own, "resid2", cell))) == set(to_json(eval_settings(config, "resid2", cell)))


def test_extraction_settings_name_their_split() -> None:
    config = load_config(REPO / "config" / "config.yaml")
    assert isinstance(extraction_settings(config, "eval"), ExtractionSettings)
    assert extraction_settings(config, "eval").split == "eval"
    assert isinstance(eval_settings(config, "resid8", sweep_cells(config)[0].name), EvalSettings)


def test_the_heldout_curve_measures_evaluate_tokens_unless_it_has_its_own() -> None:
    from conftest import tiny_config
    from saesweep.plan.config import validate_config

    def heldout_tokens(**overrides) -> int:
        config = validate_config(tiny_config("model", "corpus", **overrides))
        return train_settings(config, "resid2", sweep_cells(config)[0].name).heldout.tokens

    assert heldout_tokens() == 2000 and heldout_tokens(**{"train.heldout.tokens": 500}) == 500
