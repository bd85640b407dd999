"""Config validation: shipped configs pass, defaults are filled, every mistake names its key;
the rule functions (token budget, learning rate, dead window) and cell names."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from conftest import REPO, tiny_config
from saesweep.core.sites import parse_site
from saesweep.plan.cells import make_cell, parse_cell, sweep_cells
from saesweep.plan.config import (
    check_sites_against_model,
    dead_window,
    learning_rate,
    load_config,
    token_budget,
    validate_config,
)
from saesweep.sae.registry import ARCHITECTURES
from saesweep.core.errors import UserError

SHIPPED = sorted((REPO / "config").glob("*.yaml"))


def base_config(**overrides):
    """A valid config that needs no model or corpus on disk."""
    return tiny_config(Path("/nonexistent/model"), Path("/nonexistent/corpus"), **overrides)


def error_of(config) -> str:
    with pytest.raises(UserError) as caught:
        validate_config(config)
    return str(caught.value)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate(path: Path) -> None:
    config = load_config(path)
    assert config["activations"]["skip_positions"] < config["activations"]["context"]
    assert sweep_cells(config), "a shipped config must have at least one cell"
    for site in config["activations"]["sites"]:
        parse_site(site)


def test_defaults_are_filled_without_touching_given_values() -> None:
    raw = base_config(**{"activations.train_tokens": 10000})  # the default budget's cells: ≤ 10 epochs
    del raw["activations"]["storage_dtype"]
    del raw["train"]
    raw_copy = copy.deepcopy(raw)
    config = validate_config(raw)
    assert raw == raw_copy, "validate_config must not modify its argument"
    assert config["activations"]["storage_dtype"] == "float16"
    assert config["activations"]["on_exhausted"] == "cycle"
    assert config["activations"]["skip_positions"] == 1
    assert config["activations"]["context"] == 32  # given, kept
    assert config["model"]["prepend_bos"] is False and config["model"]["revision"] is None
    assert config["sweep"]["seeds"] == [0]
    # a whole absent section gets its nested defaults
    train = config["train"]
    assert train["batch_size"] == 1024
    assert train["tokens"]["base"] == 300000 and train["tokens"]["max"] is None
    assert train["lr"]["base"] == pytest.approx(2e-4) and train["lr"]["n_ref"] == 16384
    assert train["adam_eps"] == pytest.approx(6.25e-10)
    assert config["evaluate"]["k_transfer_factors"] == [0.5, 1, 2, 4]  # section given, missing keys filled
    assert config["scaling"]["bootstrap"] == 20


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"sweep.k": [4, 64]}, "sweep.k"),  # k = n
        ({"sweep.archs": {"batchtopk": {"k": [4, 300]}}}, "sweep.archs.batchtopk"),
        ({"sweep.archs": {"topk": {"k": [4]}}}, "sweep.k"),  # both forms of TopK's grid
        ({"sweep.archs": {"relu": {"l1_coef": [-0.1]}}}, "sweep.archs.relu.l1_coef"),
        ({"sweep.archs": {"relu": {"l1_coef": ["a"]}}}, "sweep.archs.relu.l1_coef[0]"),
        ({"sweep.archs": {"relu": {"l1_coef": []}}}, "sweep.archs.relu.l1_coef"),
        ({"sweep.k": [4, 300]}, "sweep.k"),  # k > every n
        ({"activations.sites": ["foo3"]}, "activations.sites[0]"),
        ({"activations.sites": ["resid1", "resid"]}, "activations.sites[1]"),
        ({"activations.skip_positions": 32}, "activations.skip_positions"),
        ({"activations.skip_positions": 40}, "activations.skip_positions"),
        ({"activations.context": "32"}, "activations.context"),
        ({"activations.storage_dtype": "int8"}, "activations.storage_dtype"),
        ({"sweep.n_latents": 64}, "sweep.n_latents"),
        ({"sweep.k": [0]}, "sweep.k[0]"),
        ({"train.lr.base": -1.0}, "train.lr.base"),
        ({"train.batch_size": 1.5}, "train.batch_size"),
        ({"train.auxk.enabled": False}, "train.auxk"),  # moved: AuxK's settings are cell parameters
        ({"sweep.archs": {"batchtopk": {"k": [4], "tied_init": [2]}}}, "sweep.archs.batchtopk.tied_init"),
        ({"sweep.archs": {"relu": [{"l1_coef": [1]}, {"l1_coef": [-1]}]}}, "sweep.archs.relu[1].l1_coef"),
        ({"corpus.eval_fraction": 1.0}, "corpus.eval_fraction"),
        ({"corpus.source": "ftp"}, "corpus.source"),
        ({"model.dtype": "float64"}, "model.dtype"),
        ({"run": "bad name/with slash"}, "run"),
        ({"train.tokens.min": 5000, "train.tokens.max": 100}, "train.tokens.max"),
        ({"scaling.metrics": ["nmse", "not_a_column"]}, "scaling.metrics[1]"),
        ({"evaluate.tokens": 3000}, "evaluate.tokens"),  # more than activations.eval_tokens
        ({"train.heldout.tokens": 3000}, "train.heldout.tokens"),  # more than activations.eval_tokens
        ({"evaluate.downstream_windows": 100}, "evaluate.downstream_windows"),
        ({"evaluate.ablation_windows": 40}, "evaluate.ablation_windows"),
    ],
)
def test_bad_values_name_their_key(overrides, key) -> None:
    message = error_of(base_config(**overrides))
    assert f"config key {key}:" in message, message


def test_unknown_architectures_and_parameters_list_the_valid_ones() -> None:
    message = error_of(base_config(**{"sweep.archs": {"resnet": {"k": [4]}}}))
    assert "config key sweep.archs.resnet:" in message and "topk, multitopk" in message, message
    message = error_of(base_config(**{"sweep.archs": {"relu": {"k": [4]}}}))
    assert "config key sweep.archs.relu.k:" in message and "l1_coef" in message, message
    message = error_of(base_config(**{"sweep.archs": {"jumprelu": {"bandwidth": [0.1]}}}))
    assert "config key sweep.archs.jumprelu.l0_coef: required" in message, message


def test_unknown_keys_are_named() -> None:
    message = error_of(base_config(**{"train.lr.bogus": 1}))
    assert "train.lr" in message and "bogus" in message, message
    message = error_of(base_config(typo_section={"a": 1}))
    assert "typo_section" in message, message


def test_missing_required_keys_are_named() -> None:
    config = base_config()
    del config["corpus"]["include"]
    message = error_of(config)
    assert "config key corpus.include:" in message and "files" in message, message
    config = base_config(**{"corpus.source": "npm"})
    message = error_of(config)
    assert "config key corpus.package:" in message, message
    config = base_config(**{"corpus.source": "hf"})
    assert "config key corpus.dataset:" in error_of(config)
    config = base_config()
    del config["sweep"]
    assert "sweep" in error_of(config)
    assert "mapping" in error_of(["not", "a", "mapping"])


def test_a_budget_that_cannot_be_meant_is_refused() -> None:
    """The tiny config extracts 6000 tokens and its largest cell trains on 12000 (2 epochs)."""
    assert validate_config(base_config())  # 2 epochs: within the default limit of 10
    tiny = error_of(base_config(**{"activations.train_tokens": 10}))
    assert "config key activations.train_tokens: 10 tokens are fewer than train.geometric_median_sample (512)" in tiny
    cycled = error_of(base_config(**{"train.tokens.base": 66000}))  # 11 epochs
    assert "cell topk-n64-k4-s0 trains on 66000 tokens, 11.0 epochs of the 6000 extracted" in cycled
    assert "activations.max_epochs is 10" in cycled
    assert validate_config(base_config(**{"train.tokens.base": 66000, "activations.max_epochs": 12}))
    strict = error_of(base_config(**{"activations.on_exhausted": "error"}))
    assert "2.0 epochs of the 6000 extracted, and activations.on_exhausted is error" in strict


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n")
    with pytest.raises(UserError, match="broken.yaml"):
        load_config(broken)


def test_sites_checked_against_the_model() -> None:
    config = validate_config(base_config(**{"activations.sites": ["resid0", "mlp3", "attn4"]}))
    check_sites_against_model(config, 5)  # blocks 0..4: fine
    with pytest.raises(UserError) as caught:
        check_sites_against_model(config, 4)
    assert "config key activations.sites[2]:" in str(caught.value)
    assert "0..3" in str(caught.value)


def test_token_budget_by_hand() -> None:
    train = validate_config(base_config())["train"]
    train["tokens"] = {"base": 1000, "n_ref": 64, "n_exponent": 0.5, "k_ref": 8, "k_exponent": 1.0,
                       "min": 1, "max": None}
    # 1000 · (256/64)^0.5 · (8/4)^1 = 1000 · 2 · 2
    assert token_budget(train, 256, 4) == 4000
    # 1000 · (16/64)^0.5 · (8/32)^1 = 1000 · 0.5 · 0.25
    assert token_budget(train, 16, 32) == 125
    train["tokens"]["min"] = 200
    assert token_budget(train, 16, 32) == 200
    train["tokens"]["max"] = 3000
    assert token_budget(train, 256, 4) == 3000
    assert isinstance(token_budget(train, 64, 8), int) and token_budget(train, 64, 8) == 1000


def test_learning_rate_by_hand() -> None:
    train = validate_config(base_config())["train"]
    train["lr"].update(base=2e-4, n_ref=16384)
    assert learning_rate(train, 16384) == pytest.approx(2e-4)
    assert learning_rate(train, 65536) == pytest.approx(1e-4)  # 2e-4 / sqrt(4)
    assert learning_rate(train, 4096) == pytest.approx(4e-4)  # 2e-4 / sqrt(1/4)
    assert learning_rate(train, 2048) == pytest.approx(2e-4 * math.sqrt(8))


def test_dead_window_by_hand() -> None:
    train = validate_config(base_config())["train"]
    train["dead"].update(min_tokens=2000, factor=10)
    assert dead_window(train, 256, 4) == 2000  # 10 · 64 = 640 < 2000
    assert dead_window(train, 4096, 4) == 10240  # 10 · 1024
    assert dead_window(train, 1000, 3) == 3333  # 10 · 333.3, floored
    assert isinstance(dead_window(train, 1000, 3), int)


def test_cell_names_round_trip() -> None:
    config = validate_config(base_config(**{"sweep.seeds": [0, 7]}))
    cells = sweep_cells(config)
    assert len(cells) == 2 * 2 * 2
    assert len({cell.name for cell in cells}) == len(cells)
    for cell in cells:
        assert parse_cell(cell.name) == cell
    cell = make_cell("topk", 16384, {"k": 32}, 3)
    assert cell.name == "topk-n16384-k32-s3" and cell.setting == "topk-k32" and cell.k == 32
    assert parse_cell("topk-n16384-k32-s3") == cell
    for bad in ["topk-n16384-k32", "topk-n-k32-s0", "TopK-n16-k2-s0", "topk-n16-k2-s0/extra",
                "topk-n16-k2-lr1-s0", "topk-n16-k2.0-s0", "relu-n16-k2-s0", "foo-n16-k2-s0"]:
        with pytest.raises(UserError):
            parse_cell(bad)


def test_cell_names_of_every_architecture_name_the_knob_and_only_non_defaults() -> None:
    grids = {"topk": {"k": [4, 16]}, "multitopk": {"k": [4], "multiple": [4, 8]},
             "batchtopk": {"k": [4]}, "relu": {"l1_coef": [0.1, 1e-05], "lr_factor": [1, 0.5]},
             "jumprelu": {"l0_coef": [0.003]}, "gated": {"l1_coef": [0.25]},
             "matryoshka": {"k": [4], "prefixes": [5, 3]}, "matryoshkatopk": {"k": [4], "inner_weight": [1, 0.5]}}
    cells = sweep_cells(validate_config(base_config(**{"sweep.k": None, "sweep.archs": grids})))
    names = [cell.name for cell in cells]
    assert {cell.arch for cell in cells} == set(ARCHITECTURES)
    assert len(set(names)) == len(names) == 2 * (2 + 2 + 1 + 4 + 1 + 1 + 2 + 2)
    assert "multitopk-n64-k4-s0" in names and "multitopk-n64-k4-m8-s0" in names
    assert "matryoshka-n64-k4-p3-s0" in names and "matryoshkatopk-n256-k4-iw0.5-s0" in names
    assert "relu-n256-l1e-05-lr0.5-s0" in names and "relu-n64-l0.1-s0" in names
    for cell in cells:
        assert parse_cell(cell.name) == cell
    # adding a grid value renames no existing cell
    grids["relu"]["l1_coef"].append(0.3)
    more = [cell.name for cell in sweep_cells(validate_config(base_config(**{"sweep.k": None, "sweep.archs": grids})))]
    assert set(names) < set(more)


def test_an_architecture_may_have_its_own_dictionary_sizes() -> None:
    """TopK over five sizes for its laws with a floor, ReLU at the sweep's two."""
    grids = {"topk": {"k": [4], "n_latents": [32, 64, 128, 256, 512]}, "relu": {"l1_coef": [0.1]}}
    cells = sweep_cells(validate_config(base_config(**{"sweep.k": None, "sweep.archs": grids})))
    sizes = {arch: sorted(cell.n_latents for cell in cells if cell.arch == arch) for arch in grids}
    assert sizes == {"topk": [32, 64, 128, 256, 512], "relu": [64, 256]}
    with pytest.raises(UserError, match="sweep.archs.topk.n_latents"):
        validate_config(base_config(**{"sweep.k": None, "sweep.archs": {"topk": {"k": [4], "n_latents": [1]}}}))


def test_a_list_of_grids_gives_the_union_of_their_cells() -> None:
    """The dead-latent study's shape: a 2 × 2 (tied init × AuxK) plus variants of one corner,
    a cell that two grids both give appearing once, in the order first given."""
    grids = {"topk": [{"k": [8], "tied_init": [0, 1], "aux_coef": [0, 0.03125]},
                      {"k": [8], "aux_coef": [0.03125], "k_aux": [256, 512], "aux_error_norm": [0, 1]}]}
    config = validate_config(base_config(**{"sweep.k": None, "sweep.n_latents": [64], "sweep.archs": grids}))
    names = [cell.name for cell in sweep_cells(config)]
    assert names == ["topk-n64-k8-ax0-ti0-s0", "topk-n64-k8-ti0-s0", "topk-n64-k8-ax0-s0", "topk-n64-k8-s0",
                     "topk-n64-k8-ka256-s0", "topk-n64-k8-ka256-ae1-s0", "topk-n64-k8-ae1-s0"]
    with pytest.raises(UserError, match=r"sweep.archs.topk\[1\]: k=64 must be smaller"):
        validate_config(base_config(**{"sweep.k": None, "sweep.n_latents": [64],
                                       "sweep.archs": {"topk": [{"k": [8]}, {"k": [64]}]}}))


def test_every_architecture_declares_distinct_tags_and_a_required_knob() -> None:
    for name, cls in ARCHITECTURES.items():
        tags = [parameter.tag for parameter in cls.all_arch_parameters()]
        assert len(set(tags)) == len(tags) and "n" not in tags and "s" not in tags, name
        assert cls.knob().default is None, name
        assert cls.reference and cls.__doc__, name


def test_site_names() -> None:
    site = parse_site("mlp3")
    assert (site.kind, site.layer) == ("mlp", 3)
    with pytest.raises(UserError, match="resid"):
        parse_site("foo3")
