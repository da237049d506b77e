"""Models and local training on the demo with the tiny model: pretraining, checkpoints,
resume, finetuning (full, LoRA, DP-SGD), probes, forecast, the federation's round API."""

import copy
import json

import numpy as np
import polars as pl
import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from fedclif.cli import main
from fedclif.client.local import evaluate_round, train_round
from fedclif.client.pretrain import STATE_FILE
from fedclif.client.stage import STAGES
from fedclif.shared.config import load_config, load_tree
from fedclif.shared.errors import FedclifError
from fedclif.shared.model.models import (
    EHRModel,
    build_model,
    count_parameters,
    get_weights,
    load_model,
    n_params,
    save_model,
    set_weights,
    setup,
)
from fedclif.shared.model.sequences import Prompted, load_site_data, pad_collate
from fedclif.simulations.synth import load_preset, write_site

# Small and short enough for CPU tests; the defaults in configs/train.yaml are for real runs.
PRETRAIN = ["pretrain.context=256", "pretrain.max_steps=80", "pretrain.eval_every=20"]
FINETUNE = ["finetune.context=128", "finetune.epochs=1", "finetune.n_boot=100"]


def cli(overrides: list[str]) -> list[str]:
    """The same settings in the command line's grammar (`train.` section)."""
    return [f"train.{o}" for o in overrides]


def train_cfg(*overrides: str):
    return load_config("train", overrides=[*PRETRAIN, *FINETUNE, *overrides])


def short_pretrain(**pretrain):
    """A train config for pretraining runs of a few steps on 64-token blocks."""
    return train_cfg("pretrain.context=64", *(f"pretrain.{k}={v}" for k, v in pretrain.items()))


@pytest.fixture(scope="module")
def pretrained(demo_tokens, tmp_path_factory):
    """`fedclif train pretrain` on the demo, as a site runs it."""
    ckpt = tmp_path_factory.mktemp("pt") / "ckpt"
    args = ["train", "pretrain", "--data", str(demo_tokens), "--out", str(ckpt), *cli(PRETRAIN)]
    assert main(args) == 0
    return ckpt


def batch_of(data, n=6, context=128):
    ds = Prompted(data, "test", ["death", "long_los"], context)
    return pad_collate(data.tok.index["PAD"])([ds[i] for i in range(n)])


def test_transformers_loads_the_whole_trained_model(pretrained, demo_tokens):
    """`AutoModel.from_pretrained(ckpt)` is the model fedclif trained (EHR embeddings and
    head included): the same held-out loss, well below the unigram entropy (a backbone
    without its EHR embeddings scored worse than that)."""
    from fedclif.client.stage import STAGES

    cfg = train_cfg()
    data = load_site_data(demo_tokens, cfg.split, full=True)
    blocks = STAGES["pretrain"].examples(data, "test", cfg)
    ours, _ = load_model(pretrained)
    auto = AutoModel.from_pretrained(pretrained)
    assert isinstance(auto, EHRModel) and auto.ehr is not None
    losses = [
        STAGES["pretrain"].held_out(m.eval(), blocks, torch.device("cpu"), 8) for m in (ours, auto)
    ]
    assert losses[0] == losses[1]
    entropy = json.loads((pretrained / "metrics.json").read_text())["unigram_entropy"]
    assert losses[1] < entropy - 0.5
    # The run's resolved settings sit beside it.
    resolved = load_tree(("train", "model"), (), pretrained / "resolved.yaml")
    assert resolved.train.pretrain.max_steps == 80 and resolved.model.size == "tiny"


def test_pretraining_loss_falls_well_below_unigram_entropy(pretrained):
    m = json.loads((pretrained / "metrics.json").read_text())
    # A model that ignored context would sit at the unigram entropy (5.6 nats here).
    assert m["best_val_loss"] < m["unigram_entropy"] - 0.8
    assert m["steps"] == 80 and len(m["history"]) == 4
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in pretrained.iterdir()
    }


@pytest.mark.parametrize("arch", ["mamba2", "llama"])
@pytest.mark.parametrize("ehr", [True, False])
def test_reloaded_checkpoint_gives_identical_logits(demo_tokens, tmp_path, arch, ehr):
    data = load_site_data(demo_tokens, train_cfg().split)
    model_cfg = load_config("model/tiny", overrides=[f"arch={arch}", f"ehr_embeddings={ehr}"])
    model = build_model(model_cfg, data.tok).eval()
    save_model(model, tmp_path, data.tok, "pretrain")
    again, meta = load_model(tmp_path)
    b = batch_of(data)
    with torch.no_grad():
        assert torch.equal(model.logits(b), again.eval().logits(b))
        # transformers' Auto classes load the whole model (EHR embeddings and head too).
        auto = AutoModel.from_pretrained(tmp_path).eval()
        assert isinstance(auto, EHRModel) and (auto.ehr is not None) == ehr
        assert torch.equal(model.logits(b), auto.logits(b))
        # The head's output can differ in the last bit (BLAS takes alignment-dependent
        # paths for a freshly allocated weight); everything before it is bit-identical.
        torch.testing.assert_close(model.task_logit(b), auto.task_logit(b), rtol=1e-6, atol=1e-6)
    assert meta["tokenizer_hash"] == data.tok.hash and meta["model"]["arch"] == arch


def test_resume_continues_to_the_same_weights(demo_tokens, tmp_path):
    from fedclif.client.pretrain import pretrain

    data = load_site_data(demo_tokens, train_cfg().split, full=True)
    cfg = short_pretrain(max_steps=16, eval_every=5, patience=0, batch_size=4)
    model_cfg = load_config("model/tiny")
    pretrain(data, model_cfg, cfg, tmp_path / "whole")

    def crash(step, total, loss):
        if step == 12:  # after the evaluation (and saved state) at step 10
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(data, model_cfg, cfg, tmp_path / "cut", progress=crash)
    assert torch.load(tmp_path / "cut" / STATE_FILE)["state"]["step"] == 10
    m = pretrain(data, model_cfg, cfg, tmp_path / "cut", resume=True)
    assert m["steps"] == 16
    a = torch.load(tmp_path / "whole" / STATE_FILE)["model"]
    b = torch.load(tmp_path / "cut" / STATE_FILE)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_early_stopping_stops_when_val_loss_stalls(demo_tokens, tmp_path):
    from fedclif.client.pretrain import pretrain

    data = load_site_data(demo_tokens, train_cfg().split, full=True)
    # lr=0: the val loss never improves after the first evaluation.
    cfg = short_pretrain(max_steps=40, eval_every=2, patience=2, batch_size=2, lr=0)
    m = pretrain(data, load_config("model/tiny"), cfg, tmp_path / "es")
    assert m["steps"] == 6 and [h["step"] for h in m["history"]] == [2, 4, 6]


def test_prompted_examples_follow_the_24h_leakage_rule(demo_tokens):
    """Read off the timelines, not the labels code: a stay whose first 24 h hold an ICU
    transfer (an IMV device) is never an ICU (IMV) example; a positive example's event
    comes after 24 h, a negative example's never; a death example's outcome is its
    discharge token."""
    data = load_site_data(demo_tokens, train_cfg().split, full=True)
    tasks = ["death", "icu", "imv"]
    ds = Prompted(data, "all", tasks, 64)
    ids, tl = data.tok.index, data.stays
    marks = {"icu": ids["XFR-IN_icu"], "imv": ids["RESP_device_IMV"]}
    # Death: every stay whose discharge is known, positive when it reads Expired.
    death = dict(zip(*ds.pairs[ds.pairs[:, 1] == 0][:, [0, 2]].T, strict=True))
    for row, tokens in enumerate(tl["tokens"]):
        last = data.tok.vocab[tokens[-2]]  # DSCG_<category>, TL_END
        assert last.startswith("DSCG_")
        if last == "DSCG_Missing":  # (a rare known category is DSCG_UNK: not Expired)
            assert row not in death
        else:
            assert death[row] == (last == "DSCG_Expired")
    for k, t in enumerate(tasks[1:], 1):
        examples = dict(zip(*ds.pairs[ds.pairs[:, 1] == k][:, [0, 2]].T, strict=True))
        seen = {"window": 0, "positive": 0, "negative": 0}
        for row, (window, tokens, hours) in enumerate(
            zip(tl["tokens_24h"], tl["tokens"], tl["hours"], strict=True)
        ):
            at = np.asarray(hours)[np.asarray(tokens) == marks[t]]
            if marks[t] in window.to_list():
                assert row not in examples, (t, row)
                seen["window"] += 1
            elif row in examples:
                if examples[row]:
                    assert at.size and at.min() >= 24, (t, row)
                else:
                    assert at.size == 0, (t, row)
                seen["positive" if examples[row] else "negative"] += 1
        assert min(seen.values()) > 0, (t, seen)  # the demo has all three kinds
    # One example per stay, closed by every task's token in order; its mask and outcomes
    # are the (stay, task) pairs above.
    for i in range(len(ds)):
        item, row = ds[i], ds.examples[i]
        assert item["input_ids"][-3:].tolist() == [ids[f"TASK_{t}"] for t in tasks]
        assert len(item["input_ids"]) <= 64
        mine = ds.pairs[ds.pairs[:, 0] == row]
        assert item["task_mask"].nonzero().flatten().tolist() == mine[:, 1].tolist()
        assert item["y"][mine[:, 1]].tolist() == mine[:, 2].tolist()
    assert len(ds) == np.unique(ds.pairs[:, 0]).size < len(ds.pairs)


@pytest.fixture(scope="module")
def synthetic_site(tmp_path_factory):
    """A synthetic hospital with a strong signal (the mimic-like preset: age, severity and
    respiratory failure drive death and long stay), tokenized and briefly pretrained."""
    root = tmp_path_factory.mktemp("synthetic")
    write_site(load_preset("mimic-like"), 600, 5, root / "clif")
    assert (
        main(["tokenizer", "fit", "--data", str(root / "clif"), "--out", str(root / "tok.json")])
        == 0
    )
    assert (
        main(
            [
                "site",
                "tokenize",
                str(root / "clif"),
                "--tokenizer",
                str(root / "tok.json"),
                "--out",
                str(root / "tokens"),
            ]
        )
        == 0
    )
    steps = ["train.pretrain.max_steps=30", "train.pretrain.eval_every=30"]
    assert (
        main(
            [
                "train",
                "pretrain",
                "--data",
                str(root / "tokens"),
                "--out",
                str(root / "pt"),
                *SYNTHETIC,
                *steps,
            ]
        )
        == 0
    )
    return root


# A larger test split: AUROC on the site's deaths needs them.
SYNTHETIC = ["train.split.test=0.3", "train.pretrain.context=128"]


def test_finetune_learns_the_tasks_and_writes_their_metrics(synthetic_site, capsys):
    """Finetuned on the synthetic site, the model ranks its test stays well above chance
    on both tasks (a constant or untrained head scores 0.5), with intervals, AUPRC above
    the prevalence, and F1 at the threshold chosen on val."""
    root, out = synthetic_site, synthetic_site / "ft"
    args = ["train", "finetune", "--data", str(root / "tokens"), "--from", str(root / "pt")]
    settings = [
        *SYNTHETIC,
        "train.finetune.tasks=[death,long_los]",
        "train.finetune.context=64",
        "train.finetune.max_steps=60",
        "train.finetune.n_boot=200",
    ]
    assert main([*args, "--out", str(out), *settings]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["tasks"]) == {"death", "long_los"}
    for task, r in m["tasks"].items():
        assert r["auroc"] > 0.65 and r["auroc_low"] < r["auroc"] < r["auroc_high"], (task, r)
        assert r["auprc"] > r["prevalence"] and r["n"] >= 150
        assert 0 < r["threshold"] < 1 and r["f1"] > 0
    # The trained head is part of the saved model (no sidecar file).
    ft, meta = load_model(out)
    assert meta["stage"] == "finetune" and m["dp"] is None
    assert not torch.equal(ft.head.weight, load_model(root / "pt")[0].head.weight)
    assert "AUROC" in capsys.readouterr().out
    # The same output directory is not silently reused.
    assert main([*args, "--out", str(out), *settings]) == 1


def test_lora_saves_only_adapters_that_reload_with_peft(demo_tokens, pretrained, tmp_path):
    out = tmp_path / "lora"
    args = ["train", "finetune", "--data", str(demo_tokens), "--from", str(pretrained)]
    assert main([*args, "--out", str(out), "train.finetune.peft=lora", *cli(FINETUNE)]) == 0
    names = {p.name for p in out.iterdir()}
    assert "adapter" in names and "model.safetensors" not in names
    peft_model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(pretrained).lm, out / "adapter"
    )
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (B starts at zero)
    ft, meta = load_model(out)
    base, _ = load_model(pretrained)
    data = load_site_data(demo_tokens, train_cfg().split)
    b = batch_of(data)
    with torch.no_grad():
        assert not torch.equal(ft.logits(b), base.logits(b))
    assert meta["lora"] and meta["base"] == str(pretrained.resolve())


def test_dp_finetune_reports_spent_epsilon(demo_tokens, pretrained, tmp_path):
    """DP-SGD really ran: Gaussian noise (multiplier > 0) at the clipping norm, one example
    per patient (the unit it protects), epsilon within the target, and a model other than
    the same run without DP."""
    args = ["train", "finetune", "--data", str(demo_tokens), "--from", str(pretrained)]
    dp = ["train.dp.epsilon=4", "train.dp.delta=1e-5"]
    assert main([*args, "--out", str(tmp_path / "dp"), *dp, *cli(FINETUNE)]) == 0
    assert main([*args, "--out", str(tmp_path / "plain"), *cli(FINETUNE)]) == 0
    m = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    d = m["dp"]
    assert 0 < d["epsilon"] <= 4.0 + 1e-6 and d["delta"] == 1e-5
    assert d["noise_multiplier"] > 0.3 and d["max_grad_norm"] > 0
    data = load_site_data(demo_tokens, train_cfg().split)
    train = data.stays[data.rows("train")]
    assert m["train_examples"] == train.get_column("patient_id").n_unique() < train.height
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert plain["train_examples"] > m["train_examples"]
    dp_model, plain_model = load_model(tmp_path / "dp")[0], load_model(tmp_path / "plain")[0]
    assert not torch.allclose(dp_model.head.weight, plain_model.head.weight)


@pytest.mark.parametrize("arch", ["mamba2", "llama"])
@pytest.mark.parametrize(
    "stage,peft", [("pretrain", None), ("finetune", None), ("finetune", "lora")]
)
def test_opacus_gives_every_trainable_parameter_its_exact_per_sample_gradient(
    demo_tokens, arch, stage, peft
):
    """DP-SGD clips each example's gradient: opacus must compute one for every parameter
    that trains (the fallback for modules it has no rule for, e.g. Mamba-2's mixer and the
    RMS norms, included), and it must equal the gradient of that example alone."""
    from opacus import GradSampleModule

    cfg = train_cfg("pretrain.context=32", f"finetune.peft={'lora' if peft else 'null'}")
    data = load_site_data(demo_tokens, cfg.split, full=True)
    model_cfg = load_tree(("model",), (), None, [f"model.arch={arch}"]).model
    torch.manual_seed(0)
    model = build_model(model_cfg, data.tok)
    setup(model, cfg, stage)
    st = STAGES[stage]
    # Private examples (one per patient) must batch; the exactness check needs examples
    # whose batch-mean loss is the mean of their own losses: full blocks, one-row tasks.
    private = st.examples(data, "train", cfg, True, 0)
    st.collate(model)([private[i] for i in range(4)])
    ds = st.examples(data, "train", cfg)
    batch = st.collate(model)([ds[i] for i in range(3)])
    # In float64, so "equal" means equal: float32's summation order alone moves the
    # smallest LoRA gradients by ~1e-6 of their largest.
    model.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    single = copy.deepcopy(model)
    dp_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    st.loss_for(ds)(dp_model, batch).backward()
    trained = [(n, p) for n, p in dp_model.named_parameters() if p.requires_grad]
    assert trained and all(getattr(p, "grad_sample", None) is not None for _, p in trained)
    for i in range(3):
        single.zero_grad()
        one = {k: v[i : i + 1] for k, v in batch.items()}
        if "lengths" in one:  # unpadded, as the example is alone
            one = {k: v[:, : int(one["lengths"][0])] if v.dim() == 2 else v for k, v in one.items()}
        st.loss_for(ds)(single, one).backward()
        grads = dict(single.named_parameters())
        for n, p in trained:
            ref = grads[n.removeprefix("_module.")].grad
            assert torch.allclose(p.grad_sample[i], ref, rtol=1e-3, atol=1e-6 * ref.abs().max()), n


def test_probe_writes_results_and_plot(demo_tokens, pretrained, tmp_path):
    """Probes fitted at the demo, scored there (its test split) and at another hospital
    tokenized with the same tokenizer (every stay of it): a row per label and site, each
    over that site's own stays."""
    other = tmp_path / "other"
    write_site(load_preset("mimic-like"), 300, 4, other / "clif")
    tok = demo_tokens / "tokenizer.json"
    assert (
        main(
            [
                "site",
                "tokenize",
                str(other / "clif"),
                "--tokenizer",
                str(tok),
                "--out",
                str(other / "tokens"),
            ]
        )
        == 0
    )
    out = tmp_path / "probe"
    args = ["train", "probe", "--model", str(pretrained), "--train", str(demo_tokens)]
    assert (
        main([*args, "--test", str(other / "tokens"), "--test-split", "all", "--out", str(out)])
        == 0
    )
    r = json.loads((out / "probe.json").read_text())
    assert (out / "probe.png").stat().st_size > 10_000
    by_site = {}
    for p in r["probes"]:
        by_site.setdefault(p["test"], {})[p["label"]] = p
    assert set(by_site) == {f"{demo_tokens} (in-site)", str(other / "tokens")}
    demo = load_site_data(demo_tokens, train_cfg().split)
    there = load_site_data(other / "tokens", train_cfg().split)
    for label in ("same_admission_death", "long_length_of_stay"):
        home, away = (
            by_site[f"{demo_tokens} (in-site)"][label],
            by_site[str(other / "tokens")][label],
        )
        assert home["n"] == usable_count(demo.labels[demo.rows("test")], label)
        assert away["n"] == usable_count(there.labels, label)
        assert 0 <= away["auroc"] <= 1 and away["auroc_low"] <= away["auroc_high"]
    for s in r["trajectory"]["summary"]:
        assert s["path_length"] > 0 and s["max_jump"] > 0 and np.isfinite(s["anomaly"])
    ok = [a for a in r["trajectory"]["association"] if "error" not in a]
    assert ok and all(0 <= a["anomaly"]["p_value"] <= 1 for a in ok)


def usable_count(labels: pl.DataFrame, label: str) -> int:
    """Stays whose outcome is known (death and long stay have no 24 h exclusion)."""
    return labels.get_column(label).is_not_null().sum()


def test_forecast_prints_generated_and_actual_events(demo_tokens, pretrained, tmp_path, capsys):
    """`--json`: n generated tokens of the vocabulary (never padding, a start or a task
    token), the same under one seed, hours that never go back; the actual continuation is
    the stay's own tokens after 24 h."""
    data = load_site_data(demo_tokens, train_cfg().split, full=True, ids=["25563031"])
    tl = data.stays.row(0, named=True)
    after = [data.tok.vocab[t] for t, h in zip(tl["tokens"], tl["hours"], strict=True) if h >= 24]
    args = ["forecast", "--model", str(pretrained), "--data", str(demo_tokens), "--id", "25563031"]
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main([*args, "-n", "12", "--seed", str(seed), "--json", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name).read_text())
    text = capsys.readouterr().out
    assert after[0] in text and "forecast" in text
    gen = runs["a"]["forecast"]
    assert len(gen) == 12 and runs["b"]["forecast"] == gen and runs["c"]["forecast"] != gen
    assert all(
        t in data.tok.index and t not in ("PAD", "TL_START") and not t.startswith("TASK_")
        for t, _ in gen
    )
    hours = [h for _, h in gen]
    assert hours[0] >= 24 - 1e-6 and np.all(np.diff(hours) >= 0)
    assert [t for t, _ in runs["a"]["actual"]] == after[: len(runs["a"]["actual"])]
    assert main([*args[:-1], "no-such-stay"]) == 1


def test_data_from_another_tokenizer_is_refused(demo_dir, demo_tokens, pretrained, tmp_path):
    other = tmp_path / "tok.json"
    assert (
        main(
            [
                "tokenizer",
                "fit",
                "--data",
                str(demo_dir),
                "--out",
                str(other),
                "tokenizer.k_min_count=25",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "site",
                "tokenize",
                str(demo_dir),
                "--tokenizer",
                str(other),
                "--out",
                str(tmp_path / "t2"),
            ]
        )
        == 0
    )
    cfg = train_cfg()
    from fedclif.client.finetune import finetune

    data = load_site_data(tmp_path / "t2", cfg.split)
    with pytest.raises(FedclifError, match="tokenized with tokenizer"):
        finetune(data, pretrained, cfg, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
    args = ["train", "probe", "--model", str(pretrained), "--train", str(tmp_path / "t2")]
    assert main([*args, "--out", str(tmp_path / "p")]) == 1
    model, _ = load_model(pretrained)
    with pytest.raises(FedclifError, match="tokenized with tokenizer"):
        train_round(model, data, cfg, "finetune")


def test_round_api_is_deterministic_and_sends_only_what_trains(demo_tokens, pretrained):
    cfg = train_cfg("pretrain.max_steps=3", "finetune.max_steps=3", "finetune.peft=lora")
    full = load_site_data(demo_tokens, cfg.split, full=True)
    runs = []
    for _ in range(2):
        model, _ = load_model(pretrained)
        runs.append(train_round(model, full, cfg, "pretrain", seed=7))
    a, b = runs
    assert a.weights.keys() == b.weights.keys()
    assert not any(k.startswith("head.") for k in a.weights)  # the task head is not trained
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])
    assert a.metrics["num_examples"] > 0 and a.metrics["steps"] == 3

    model, _ = load_model(pretrained)
    r = train_round(model, full, cfg, "finetune", seed=7)
    assert all("lora" in k or k.startswith("head.") for k in r.weights)
    # A round's weights load into a fresh model set up the same way.
    fresh, _ = load_model(pretrained)
    before = evaluate_round(fresh, full, cfg, "finetune")
    train_round(fresh, full, train_cfg("finetune.max_steps=1", "finetune.peft=lora"), "finetune")
    set_weights(fresh, r.weights)
    assert evaluate_round(fresh, full, cfg, "finetune") == evaluate_round(
        model, full, cfg, "finetune"
    )
    assert before["num_examples"] > 0 and "death_auroc" in before
    with pytest.raises(FedclifError, match="shape"):
        set_weights(fresh, {k: np.zeros(3) for k in get_weights(fresh)})


def test_fedprox_mu_anchors_the_site_to_the_weights_it_was_sent(demo_tokens, pretrained):
    """The proximal term is in the site's loss: the same round with a large mu moves the
    weights less than without it, and mu = 0 is plain FedAvg's local step, bit for bit."""
    cfg = train_cfg("pretrain.max_steps=6", "pretrain.context=64", "pretrain.lr=0.01")
    data = load_site_data(demo_tokens, cfg.split, full=True)
    start = get_weights(load_model(pretrained)[0])

    def moved(mu: float) -> tuple[float, dict]:
        r = train_round(load_model(pretrained)[0], data, cfg, "pretrain", seed=3, proximal_mu=mu)
        return sum(float(np.sum((r.weights[k] - start[k]) ** 2)) for k in r.weights), r.weights

    plain, w0 = moved(0.0)
    assert moved(0.0)[1].keys() == w0.keys()
    prox, _ = moved(50.0)
    assert 0 < prox < 0.5 * plain


def test_dp_rounds_protect_the_patient_in_both_stages(demo_tokens, pretrained):
    """Under DP-SGD a round's examples are its training split's patients (one each), and
    pretraining and finetuning both spend epsilon."""
    dp = ("train.dp.epsilon=8", "train.dp.delta=1e-4")
    cfg = train_cfg("pretrain.max_steps=2", "finetune.max_steps=2", *(d[6:] for d in dp))
    data = load_site_data(demo_tokens, cfg.split, full=True)
    patients = data.stays[data.rows("train")].get_column("patient_id").n_unique()
    assert patients < len(data.rows("train"))  # the demo has patients with several stays
    for stage in ("pretrain", "finetune"):
        model, _ = load_model(pretrained)
        r = train_round(model, data, cfg, stage, seed=3)
        assert r.metrics["num_examples"] == patients
        assert 0 < r.metrics["epsilon"] <= 8


def test_bad_training_input_is_refused(demo_tokens, pretrained, tmp_path, capsys):
    base = ["train", "pretrain", "--data", str(demo_tokens)]
    assert main([*base, "--out", str(tmp_path / "a"), "model.size=huge"]) == 1
    assert main([*base, "--out", str(tmp_path / "a"), "train.pretrain.lr_typo=1"]) == 1
    assert main([*base, "--out", str(tmp_path / "a"), "pretrain.lr=1"]) == 1  # no section
    assert main([*base, "--out", str(tmp_path / "a"), "model.shapes.mamba2.head_dim=7"]) == 1
    assert main([*base, "--out", str(tmp_path / "nothing"), "--resume"]) == 1
    assert main([*base, "--out", str(demo_tokens)]) == 1  # not a fedclif output: untouched
    assert (demo_tokens / "timelines.parquet").is_file()
    err = capsys.readouterr().err
    for msg in (
        "unknown model",
        "lr_typo",
        "num_heads * head_dim",
        "nothing to resume",
        "not a fedclif output",
    ):
        assert msg in err
    with pytest.raises(FedclifError, match="unknown task"):
        Prompted(load_site_data(demo_tokens, train_cfg().split), "train", ["death", "coma"], 64)
    assert pl.read_parquet(demo_tokens / "labels.parquet").height == 272
    # A Hugging Face model that is not a fedclif one is refused by name, not a traceback.
    plain = tmp_path / "plain-llama"
    shape = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    LlamaForCausalLM(LlamaConfig(vocab_size=32, intermediate_size=32, **shape)).save_pretrained(
        plain
    )
    ft = ["train", "finetune", "--data", str(demo_tokens), "--from", str(plain)]
    assert main([*ft, "--out", str(tmp_path / "ft")]) == 1
    assert "is not a fedclif checkpoint" in capsys.readouterr().err


def test_parameters_are_counted_without_building_the_model(demo_tokens):
    """The size a site's policy caps is counted on the meta device: the same count, and a
    model the size of the largest config is never allocated."""
    tok = load_site_data(demo_tokens, train_cfg().split).tok
    for size in ("tiny", "small"):
        cfg = load_config(f"model/{size}")
        assert count_parameters(cfg, tok) == n_params(build_model(cfg, tok))
    assert count_parameters(load_config("model/1b"), tok) > 10**9
