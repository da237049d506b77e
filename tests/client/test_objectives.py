"""Pretraining objectives beyond next-token prediction (shared/model/objectives.py): the losses
against loop-written references, their per-sample gradients under DP-SGD, each one
learning on a small synthetic site, their heads' life cycle (save, load, federated
arrays, left out of finetuning) and the admission codes that are targets, never inputs."""

import copy
import json
import math
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from conftest import read, run_tokenize, write
from transformers import AutoModel

from fedclif.cli import main
from fedclif.client.loop import fit
from fedclif.client.stage import STAGES
from fedclif.shared.config import load_config
from fedclif.shared.errors import FedclifError
from fedclif.shared.model.models import build_model, get_weights, load_model, save_model, setup
from fedclif.shared.model.objectives import (
    masked_mse,
    omega,
    omega_loss,
    patch_nce,
    patch_pool,
    pieces,
    stages,
    weights_at,
)
from fedclif.shared.model.sequences import StayViews, load_site_data
from fedclif.shared.tokens.timeseries import variables
from fedclif.shared.tokens.tokenizer import Tokenizer
from fedclif.simulations.synth import load_preset, write_site

TS = [
    "pretrain.context=96",
    "pretrain.batch_size=8",
    "pretrain.ts.hours=20",
    "pretrain.ts.stay_hours=12",
]
EVERY = ["ts_align", "ts_recon", "stay_recon", "masked_codes", "code_contrast"]


def cfg_with(*objectives: str, **extra):
    weights = {k: 1.0 for k in objectives}
    over = [*TS, *(f"pretrain.objectives.{k}={v}" for k, v in weights.items())]
    return load_config("train", overrides=[*over, *(f"{k}={v}" for k, v in extra.items())])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A small mimic-like hospital, tokenized: hourly vitals and labs, diagnoses, drugs."""
    root = tmp_path_factory.mktemp("objectives")
    write_site(load_preset("mimic-like"), 240, 3, root / "clif")
    tok = root / "tok.json"
    assert main(["tokenizer", "fit", "--data", str(root / "clif"), "--out", str(tok)]) == 0
    return run_tokenize(root / "clif", tok, root / "tokens")


# --- the losses against loops ----------------------------------------------------------


def _cos(a, b) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _logsumexp(xs) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _patches():
    g = torch.Generator().manual_seed(0)
    v, z = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    valid = torch.tensor(
        [[1, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool
    )  # the second stay has one patch: nothing to contrast
    return v, z, valid


def test_patch_nce_matches_a_loop():
    v, z, valid = _patches()
    tau, total = 0.1, 0.0
    for b in range(3):
        idx = [i for i in range(5) if valid[b, i]]
        if len(idx) < 2:
            continue
        per = []
        for i in idx:
            logits = [_cos(v[b, i], z[b, k]) / tau for k in idx]
            per.append(_logsumexp(logits) - logits[idx.index(i)])
        total += sum(per) / len(per)
    assert float(patch_nce(v, z, valid, tau)) == pytest.approx(total / 3, rel=1e-5)


def test_omega_is_a_masked_softmax_and_its_loss_matches_a_loop():
    v, z, valid = _patches()
    w = omega(z, valid)
    for b in range(3):
        idx = [i for i in range(5) if valid[b, i]]
        for i in range(5):
            others = [k for k in idx if k != i]
            if i not in idx or not others:
                assert float(w[b, i].abs().sum()) == 0  # no weights for an absent patch
                continue
            sims = [_cos(z[b, i], z[b, k]) for k in others]
            ref = {k: math.exp(s - _logsumexp(sims)) for k, s in zip(others, sims, strict=True)}
            for j in range(5):
                assert float(w[b, i, j]) == pytest.approx(ref.get(j, 0.0), abs=1e-6)
    # Cosine similarity is symmetric: w_ij / w_ji is the ratio of the rows' normalisers.
    z0 = torch.nn.functional.normalize(z[0], dim=-1)
    norm = [sum(math.exp(float(z0[i] @ z0[k])) for k in (0, 1, 3, 4) if k != i) for i in range(5)]
    assert float(w[0, 0, 1] / w[0, 1, 0]) == pytest.approx(norm[1] / norm[0], rel=1e-5)
    tau, total = 0.5, 0.0
    for b in range(3):
        idx = [i for i in range(5) if valid[b, i]]
        per = []
        for i in idx:
            earlier = [j for j in idx if j < i]
            if not earlier or len(idx) < 2:
                continue
            others = [k for k in idx if k != i]
            logits = [_cos(v[b, i], v[b, k]) / tau for k in others]
            lse = _logsumexp(logits)
            per.append(-sum(float(w[b, i, j]) * (logits[others.index(j)] - lse) for j in earlier))
        total += sum(per) / len(per) if per else 0.0
    assert float(omega_loss(v, z, valid, tau)) == pytest.approx(total / 3, rel=1e-5)


def test_reconstruction_scores_observed_entries_only_and_pooling_skips_the_absent():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.rand(2, 4, 3, generator=g) > 0.5
    ref = np.mean([((pred[b] - target[b])[mask[b]] ** 2).mean() for b in range(2)])
    assert float(masked_mse(pred, target, mask)) == pytest.approx(float(ref), rel=1e-6)
    moved = target.masked_fill(~mask, 99.0)  # a missing value is never a target
    assert float(masked_mse(pred, moved, mask)) == pytest.approx(float(ref), rel=1e-6)
    h = torch.arange(12.0).reshape(1, 6, 2)
    pooled, present = patch_pool(h, torch.tensor([[0, 0, 2, -1, 2, 5]]), 3)
    assert present.tolist() == [[True, False, True]]
    assert pooled[0, 0].tolist() == [1.0, 2.0] and pooled[0, 2].tolist() == [6.0, 7.0]


# --- configuration ---------------------------------------------------------------------


def test_objective_sets_and_stages_are_checked():
    c = cfg_with("ts_align").pretrain
    assert stages(c) == [({"next_token": 1.0, "ts_align": 1.0}, 1.0)]
    staged = load_config(
        "train",
        overrides=[
            "pretrain.stages=[{objectives: {stay_recon: 1}, share: 0.25},"
            "{objectives: {next_token: 1, masked_codes: 1}, share: 0.75}]"
        ],
    ).pretrain
    assert weights_at(staged, 0.0) == {"stay_recon": 1.0}
    assert weights_at(staged, 0.5) == {"next_token": 1.0, "masked_codes": 1.0}
    # A one-round run trains each stage in turn; a round inside a stage trains that one.
    assert pieces(staged) == [(0.125, 0.25), (0.625, 0.75)]
    assert pieces(staged, 0.0, 0.5) == [(0.125, 0.5), (0.375, 0.5)]
    assert pieces(staged, 0.5, 0.75) == [(0.625, 1.0)]
    for bad, says in [
        ("pretrain.stages=[{objectives: {stay_recon: 1}, share: 0.5}]", "sum to 0.5"),
        ("pretrain.stages=[{objectives: {typo: 1}, share: 1}]", "unknown objective"),
        ("pretrain.objectives.next_token=0", "at least one > 0"),
    ]:
        with pytest.raises(FedclifError, match=says):
            stages(load_config("train", overrides=[bad]).pretrain)


# --- training --------------------------------------------------------------------------


def _views(data, cfg, split="train", private=False):
    return STAGES["pretrain"].examples(data, split, cfg, private, 0)


def test_stay_views_carry_the_grid_and_codes_of_their_stay(site):
    cfg = cfg_with("ts_align", "masked_codes")
    data = load_site_data(site, cfg.split, full=True)
    ds = _views(data, cfg)
    assert isinstance(ds, StayViews) and len(ds) == data.rows("train").size
    item = ds[3]
    stay = data.stays[int(data.rows("train")[3]) :][:1]
    tokens = stay.get_column("tokens").to_list()[0]
    assert item["input_ids"].tolist() == tokens[:96]
    assert item["grid"].shape == item["grid_mask"].shape == (20, len(variables(data.tok)))
    assert (
        bool(item["grid_mask"].any()) and float(item["grid"][~item["grid_mask"]].abs().sum()) == 0
    )
    codes = pl.read_parquet(site / "timelines.parquet", columns=["hospitalization_id", "codes"])
    mine = codes.filter(pl.col("hospitalization_id") == stay.item(0, "hospitalization_id"))
    assert (
        sorted(torch.nonzero(item["codes"]).flatten().tolist()) == mine.item(0, "codes").to_list()
    )
    # Under DP one example per patient.
    private = _views(data, cfg, private=True)
    train_patients = data.stays[data.rows("train")].get_column("patient_id").n_unique()
    assert len(private) == train_patients < len(ds)


@pytest.mark.parametrize("objective", EVERY)
def test_each_objective_learns_on_a_small_site(site, objective):
    """Trained on its loss alone for a few dozen steps, each objective's held-out loss
    falls from the fresh model's."""
    cfg = cfg_with(objective, **{"pretrain.objectives.next_token": 0, "pretrain.lr": 3e-3})
    data = load_site_data(site, cfg.split, full=True)
    st = STAGES["pretrain"]
    torch.manual_seed(0)
    model = build_model(load_config("model/tiny"), data.tok, cfg.pretrain)
    setup(model, cfg, "pretrain")
    train, val = _views(data, cfg), _views(data, cfg, "val")
    assert train.spec.weights == {objective: 1.0}

    def held_out() -> float:
        torch.manual_seed(1)  # masked_codes draws its mask: the same one each time
        return st.held_out_parts(model, val, torch.device("cpu"), 16)[objective]

    before = held_out()
    steps = ["max_steps=40", "eval_every=0", "lr=3e-3", "warmup_steps=5"]
    c = load_config("train", overrides=[f"pretrain.{o}" for o in steps]).pretrain
    fit(model, st.loss_for(train), train, st.collate(model), c, torch.device("cpu"))
    after = held_out()
    assert after < 0.9 * before, (objective, before, after)


def test_per_stay_objectives_have_exact_per_sample_gradients(site):
    """The TS alignment (negatives within the stay), reconstruction and masked-code losses
    give each stay its own gradient, which DP-SGD clips: opacus' per-sample gradients
    (two backbone passes per step, tokens and series) equal each stay's alone."""
    from opacus import GradSampleModule

    cfg = cfg_with("ts_align", "ts_recon", "stay_recon")
    cfg.pretrain.objectives.next_token = 0
    data = load_site_data(site, cfg.split, full=True)
    torch.manual_seed(0)
    model = build_model(load_config("model/tiny"), data.tok, cfg.pretrain)
    setup(model, cfg, "pretrain")
    st = STAGES["pretrain"]
    ds = _views(data, cfg)
    batch = st.collate(model)([ds[i] for i in range(3)])
    single = copy.deepcopy(model)
    dp_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    st.loss_for(ds)(dp_model, batch).backward()
    trained = [(n, p) for n, p in dp_model.named_parameters() if p.requires_grad]
    assert any("pretrain_heads" in n for n, _ in trained)
    for i in range(3):
        single.zero_grad()
        st.loss_for(ds)(single, st.collate(single)([ds[i]])).backward()
        grads = dict(single.named_parameters())
        for n, p in trained:
            ref = grads[n.removeprefix("_module.")].grad
            if ref is None:  # not reached by these objectives (the LM head)
                assert p.grad_sample is None or float(p.grad_sample[i].abs().sum()) == 0, n
                continue
            assert torch.allclose(p.grad_sample[i], ref, rtol=1e-3, atol=1e-6 * ref.abs().max()), n


def test_in_batch_contrast_and_staged_runs_are_refused_under_dp(site, tmp_path, capsys):
    base = ["train", "pretrain", "--data", str(site), "train.dp.epsilon=4"]
    assert (
        main([*base, "--out", str(tmp_path / "a"), "train.pretrain.objectives.code_contrast=1"])
        == 1
    )
    err = capsys.readouterr().err
    assert "code_contrast" in err and "train.pretrain.objectives.code_contrast=0" in err
    staged = (
        "train.pretrain.stages=[{objectives: {stay_recon: 1}, share: 0.5},"
        "{objectives: {next_token: 1}, share: 0.5}]"
    )
    assert main([*base, "--out", str(tmp_path / "b"), staged]) == 1
    assert "nor run under DP-SGD" in capsys.readouterr().err.replace("\n", " ")
    # A per-stay objective alone runs under DP: parts it leaves out (the token pass, the
    # LM head) still get their (zero) per-sample gradients.
    alone = ["train.pretrain.objectives.next_token=0", "train.pretrain.objectives.ts_recon=1"]
    steps = ["train.pretrain.epochs=1", "train.pretrain.context=64"]
    assert main([*base, "--out", str(tmp_path / "c"), *alone, *steps]) == 0
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert 0 < m["dp"]["epsilon"] <= 4 and set(m["val_losses"]) == {"ts_recon"}


# --- heads: saved, loaded, sent, and left out of finetuning ----------------------------


def test_staged_pretraining_saves_heads_that_load_and_stay_out_of_finetuning(site, tmp_path):
    """MedHMP's two stages from the command line; the checkpoint reloads with every head;
    finetuning (full or LoRA) neither trains nor sends them."""
    out = tmp_path / "pt"
    staged = (
        "train.pretrain.stages=[{objectives: {next_token: 1, stay_recon: 1}, share: 0.5},"
        "{objectives: {next_token: 1, masked_codes: 1, code_contrast: 1}, share: 0.5}]"
    )
    over = [f"train.{o}" for o in TS] + [
        "train.pretrain.max_steps=12",
        "train.pretrain.eval_every=6",
    ]
    assert main(["train", "pretrain", "--data", str(site), "--out", str(out), staged, *over]) == 0
    m = json.loads((out / "metrics.json").read_text())
    sets = [h["objectives"] for h in m["history"]]
    assert sets[0] == {"next_token": 1.0, "stay_recon": 1.0}
    assert sets[-1] == {"next_token": 1.0, "masked_codes": 1.0, "code_contrast": 1.0}
    assert m["steps"] == 12 and set(m["val_losses"]) == set(sets[-1])
    model = AutoModel.from_pretrained(out)
    assert model.config.objectives == ["stay_recon", "masked_codes", "code_contrast"]
    again, _ = load_model(out)
    _same_heads(model, again)
    cfg = load_config("train", overrides=[o.removeprefix("train.") for o in (staged, *over)])
    setup(model, cfg, "pretrain")
    assert any(k.startswith("pretrain_heads.stay_out") for k in get_weights(model))
    for peft in ("null", "lora"):
        cfg.finetune.peft = None if peft == "null" else "lora"
        ft = copy.deepcopy(model)
        setup(ft, cfg, "finetune")
        sent = get_weights(ft)
        assert sent and not any(k.startswith("pretrain_heads") for k in sent), peft
    ft = tmp_path / "ft"
    args = ["train", "finetune", "--data", str(site), "--from", str(out), "--out", str(ft)]
    args += ["train.finetune.max_steps=2", "train.finetune.tasks=[death]"]
    assert main(args) == 0
    tuned, _ = load_model(ft)
    _same_heads(tuned, again)


def _same_heads(a, b) -> None:
    """Two models' objective heads hold equal weights."""
    pairs = zip(
        a.pretrain_heads.named_parameters(), b.pretrain_heads.named_parameters(), strict=True
    )
    for (name, x), (_, y) in pairs:
        assert torch.equal(x, y), name


def test_the_default_objective_builds_the_model_it_always_did(site):
    """next_token alone adds no head, and heads, when asked for, are built after every
    other part: the backbone's seeded initial weights do not change."""
    tok = Tokenizer.load(site / "tokenizer.json")
    torch.manual_seed(0)
    plain = build_model(load_config("model/tiny"), tok)
    torch.manual_seed(0)
    default = build_model(load_config("model/tiny"), tok, load_config("train").pretrain)
    torch.manual_seed(0)
    heads = build_model(load_config("model/tiny"), tok, cfg_with(*EVERY).pretrain)
    assert default.pretrain_heads is None and heads.pretrain_heads is not None
    a, b, c = (dict(m.named_parameters()) for m in (plain, default, heads))
    assert a.keys() == b.keys() < c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k


def test_heads_save_and_load_with_the_model(site, tmp_path):
    tok = Tokenizer.load(site / "tokenizer.json")
    model = build_model(load_config("model/tiny"), tok, cfg_with(*EVERY).pretrain)
    save_model(model, tmp_path / "ck", tok, "pretrain")
    back, _ = load_model(tmp_path / "ck")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("pretrain_heads.ts_in") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- admission codes: targets, never inputs --------------------------------------------


def test_diagnoses_are_targets_never_tokens(demo_dir, demo_tokens, tmp_path):
    """Hospital diagnoses (coded at discharge) become the tokenizer's targets, with the
    vocabulary's k-suppression and ICD-10-CM only, and never a token: without the
    diagnosis table every timeline, 24 h input included, is the same."""
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    assert not any(t.startswith(("DX_", "DRUG_")) for t in tok.vocab)
    dx = [t for t in tok.targets if t.startswith("DX_")]
    assert dx and any(t.startswith("DRUG_") for t in tok.targets)
    raw = read(demo_dir, "hospital_diagnosis").filter(pl.col("diagnosis_code_format") == "ICD10CM")
    per_stay = (
        raw.select(
            "hospitalization_id",
            pl.col("diagnosis_code")
            .str.replace_all(".", "", literal=True)
            .str.slice(0, 3)
            .alias("c"),
        )
        .unique()
        .group_by("c")
        .len()
    )
    k = int(tok.config["stats"]["min_cell_count"])
    common = set(per_stay.filter(pl.col("len") >= max(k, int(tok.config["k_min_count"])))["c"])
    assert {t[3:] for t in dx} <= set(per_stay["c"]) and len({t[3:] for t in dx} & common) > 0
    rare = set(per_stay.filter(pl.col("len") < k)["c"])
    assert rare and not rare & {t[3:] for t in dx}
    # The same site without its diagnoses, tokenized with the same tokenizer.
    site = tmp_path / "site"
    shutil.copytree(demo_dir, site)
    (site / "clif_hospital_diagnosis.parquet").unlink()
    run_tokenize(site, demo_tokens / "tokenizer.json", tmp_path / "out")
    cols = ["hospitalization_id", "tokens", "tokens_24h", "hours_24h"]
    a = pl.read_parquet(demo_tokens / "timelines.parquet")
    b = pl.read_parquet(tmp_path / "out" / "timelines.parquet")
    assert a.select(cols).equals(b.select(cols))
    dx_ids = {i for i, t in enumerate(tok.targets) if t.startswith("DX_")}
    with_dx = a.get_column("codes").to_list()
    without = b.get_column("codes").to_list()
    assert any(set(c) & dx_ids for c in with_dx) and not any(set(c) & dx_ids for c in without)
    # And a changed diagnosis changes no token either.
    edited = read(demo_dir, "hospital_diagnosis").with_columns(
        pl.lit("I50.9").alias("diagnosis_code")
    )
    write(site, "hospital_diagnosis", edited)
    run_tokenize(site, demo_tokens / "tokenizer.json", tmp_path / "edited")
    c = pl.read_parquet(tmp_path / "edited" / "timelines.parquet")
    assert a.select(cols).equals(c.select(cols))
