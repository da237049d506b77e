"""The one config grammar (shared/config.py): sections, layers in a fixed order, typos as
errors, and a run's resolved tree that can be given back as --config."""

import json

import pytest
from omegaconf import OmegaConf

from fedclif.cli import main
from fedclif.shared.config import load_tree, write_resolved
from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import load_federation
from fedclif.simulations.commands import load_study


def test_layers_apply_in_order_and_the_command_line_wins(tmp_path):
    # configs/train.yaml says cosine; a federated run's layer says constant (short rounds).
    assert load_tree(("train",)).train.pretrain.schedule == "cosine"
    assert load_federation().train.pretrain.schedule == "constant_with_warmup"
    f = tmp_path / "mine.yaml"
    f.write_text("train: {pretrain: {schedule: linear, lr: 0.5}}\nfederation: {min_sites: 3}\n")
    cfg = load_federation(f, ["train.pretrain.lr=0.25"])
    assert cfg.train.pretrain.schedule == "linear" and cfg.train.pretrain.lr == 0.25
    assert cfg.federation.min_sites == 3
    # The study's layer sits over the federated run's: its finetuning decays (cosine).
    study = load_study(None, "quick", ["train.finetune.lr=0.01"])
    assert study.train.finetune.schedule == "cosine" and study.train.finetune.lr == 0.01
    assert study.train.pretrain.context == 128  # the quick profile's
    assert study.model.arch == "llama" and study.model.size == "tiny"


def test_model_size_picks_the_file_and_arch_overrides_it():
    cfg = load_tree(("model",), (), None, ["model.size=small", "model.arch=llama"])
    assert cfg.model.size == "small" and cfg.model.arch == "llama"
    assert (
        cfg.model.shapes.mamba2.hidden_size > load_tree(("model",)).model.shapes.mamba2.hidden_size
    )
    with pytest.raises(FedclifError, match=r"unknown model\.size 'huge'"):
        load_tree(("model",), (), None, ["model.size=huge"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pretrain.lr=1"], "unknown section"),  # no section
        (["train.pretrain.lrr=1"], "lrr"),  # a typo
        (["federation.rounds.pretrain=2"], r"settings must start with one of: train\."),
        (["train.pretrain.lr"], "section.key=value"),
    ],
)
def test_bad_settings_are_errors(overrides, message):
    with pytest.raises(FedclifError, match=message):
        load_tree(("train",), (), None, overrides)


def test_a_typo_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: {finetune: {epochz: 3}}\n")
    with pytest.raises(FedclifError, match=r"bad\.yaml.*epochz"):
        load_tree(("train",), (), f)


def test_the_resolved_tree_comes_back_as_a_config(tmp_path):
    cfg = load_federation(
        None,
        [
            "train.finetune.peft=lora",
            "federation.strategy.name=fedprox",
            "federation.strategy.options.proximal_mu=0.1",
        ],
    )
    path = write_resolved(cfg, tmp_path)
    assert path.name == "resolved.yaml"
    assert load_federation(path) == cfg
    assert OmegaConf.to_container(load_federation(path)) == OmegaConf.to_container(cfg)


def test_settings_may_follow_options_on_the_command_line(demo_dir, tmp_path):
    """`fedclif site stats DIR --out F tokenizer.x=...`: argparse alone rejects a
    positional after an option when another positional comes first."""
    out = tmp_path / "s.json"
    args = ["site", "stats", str(demo_dir), "--out", str(out), "tokenizer.stats.min_cell_count=20"]
    assert main(args) == 0
    assert json.loads(out.read_text())["config"]["min_cell_count"] == 20
    with pytest.raises(SystemExit):
        main(["site", "stats", str(demo_dir), "--out", str(out), "--bogus"])
    with pytest.raises(SystemExit):  # a command that takes no settings
        main(["site", "inspect", str(tmp_path), "--id", "1", "site.timezone=UTC"])


def test_a_command_reads_its_config_file_under_the_command_line(demo_dir, tmp_path, capsys):
    """`--config FILE` on a command: the file's settings apply, the command line's win
    over them, and a typo in the file is an error naming the file and exiting 1."""
    f = tmp_path / "site.yaml"
    f.write_text("tokenizer: {stats: {min_cell_count: 20, sig_figs: 2}}\n")
    out = tmp_path / "s.json"
    args = ["site", "stats", str(demo_dir), "--out", str(out), "--config", str(f)]
    assert main([*args, "tokenizer.stats.min_cell_count=30"]) == 0
    c = json.loads(out.read_text())["config"]
    assert (c["min_cell_count"], c["sig_figs"]) == (30, 2)
    f.write_text("tokenizer: {stats: {min_cell_cont: 20}}\n")
    assert main(args) == 1
    assert "site.yaml" in capsys.readouterr().err
