"""Which training recipe lets the foundation model learn what the gradient-boosted tree
learns: a sweep over the study's own tokenized sites (issue 32).

Each setting (`section.key=value` overrides of the study's own config, read from its
results.json: `base` is the study as it ran) pretrains the source model as the study's
source-only arm does (`study.pretrain.rounds x steps_per_round` steps), finetunes it at
the source (`study.finetune_steps`) and, from the same pretrained weights, on all of the
target's training split; finetuning trains death and long stay, the two tasks the
transfer paper reports. Printed per setting, means over `--seeds`: AUROC on the source's
validation split (what a setting is chosen by), on the source's test split, zero-shot on
every target stay, finetuned at the target on the target's test split, and the wall
seconds of pretraining and of one finetuning. The tree (shared/evaluation/baseline.py,
fitted on each site's train split) is the bar, scored on the same splits.

    fedclif simulate --out runs/transfer                 # the study whose sites it reads
    python -m bench.recipe --study runs/transfer         # every setting, seeds 0 1
    python -m bench.recipe --study runs/transfer --only base finetune-steps-300 --seeds 0
    python -m bench.recipe --study runs/transfer --only base finetune-epochs-10 \
        --shares 0.02 0.05 0.25 --seeds 0 1 2   # never worse with more target data?
"""

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("bench.recipe")
TASKS = ("death", "long_los")
SETTINGS: dict[str, list[str]] = {
    "base": [],
    "finetune-steps-200": ["study.finetune_steps=200"],
    "finetune-steps-300": ["study.finetune_steps=300"],
    "finetune-steps-200-batch-16": ["study.finetune_steps=200", "train.finetune.batch_size=16"],
    "finetune-steps-150": ["study.finetune_steps=150"],
    "finetune-epochs-10": ["train.finetune.epochs=10"],
    "finetune-epochs-3": ["train.finetune.epochs=3"],
    "finetune-lr-3e-4": ["train.finetune.lr=3e-4"],
    "finetune-lr-3e-3": ["train.finetune.lr=3e-3"],
    "finetune-context-256": ["train.finetune.context=256"],
    "lora": ["train.finetune.peft=lora"],
    "pretrain-steps-x2": ["study.pretrain.steps_per_round=120"],
    "pretrain-steps-x0.75, finetune-steps-150": [
        "study.pretrain.steps_per_round=45",
        "study.finetune_steps=150",
    ],
    "width-128": ["model.shapes.llama.hidden_size=128", "model.shapes.llama.intermediate_size=384"],
}


def setting_config(study: DictConfig, overrides: list[str], seed: int) -> DictConfig:
    """The study's tree with `overrides`, its train section set up as the source-only arm's
    jobs run (step budgets from the study section, the seed)."""
    cfg = OmegaConf.merge(study, OmegaConf.from_dotlist(overrides))
    s = cfg.study
    cfg.train.seed = seed
    cfg.train.pretrain.max_steps = int(s.pretrain.rounds) * int(s.pretrain.steps_per_round)
    cfg.train.finetune.max_steps = int(s.finetune_steps)
    cfg.train.finetune.tasks = list(TASKS)
    return cfg


def fm(
    cfg: DictConfig,
    source: Path,
    target: Path,
    out: Path,
    pretrained: Path,
    shares: tuple[float, ...] = (),
) -> dict:
    """Pretrain at the source (or reuse a model pretrained alike under `pretrained`),
    finetune there and at the target (also on each of `shares` of its training patients,
    as the study's recovery curve does): AUROCs and seconds."""
    from fedclif.client.finetune import evaluate_tasks, finetune
    from fedclif.client.pretrain import pretrain
    from fedclif.shared.model.models import load_model
    from fedclif.shared.model.sequences import load_site_data

    t = cfg.train
    src = load_site_data(source, t.split, full=True)
    tgt = load_site_data(target, t.split)
    # Settings that differ only in finetuning share their pretrained model (the same seed
    # and settings give the same weights): keyed by everything pretraining reads.
    what = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, ["model"])) + OmegaConf.to_yaml(
        OmegaConf.masked_copy(t, ["pretrain", "split", "seed", "device"])
    )
    pre = pretrained / hashlib.sha256(what.encode()).hexdigest()[:12]
    if not (pre / "seconds.json").is_file():
        t0 = time.perf_counter()
        pretrain(src, cfg.model, t, pre)
        (pre / "seconds.json").write_text(json.dumps(time.perf_counter() - t0))
    t1 = time.perf_counter()
    got = finetune(src, pre, t, out / "source")["tasks"]
    t2 = time.perf_counter()
    at_target = finetune(tgt, pre, t, out / "target")["tasks"]
    model, _ = load_model(out / "source")
    val = evaluate_tasks(model, src, list(TASKS), t, "val")
    zero = evaluate_tasks(model, tgt, list(TASKS), t, "all")
    row = {"pretrain_s": json.loads((pre / "seconds.json").read_text()), "finetune_s": t2 - t1}
    for share in shares:
        part = OmegaConf.merge(t, {"split": {"train_fraction": share}})
        got_at = finetune(load_site_data(target, part.split), pre, part, out / f"target-{share:g}")
        row[f"share {share:g}"] = float(np.mean([got_at["tasks"][k]["auroc"] for k in TASKS]))
    row["share 1"] = float(np.mean([at_target[k]["auroc"] for k in TASKS]))
    for task in TASKS:
        row |= {
            f"{task} source val": val[task]["auroc"],
            f"{task} source test": got[task]["auroc"],
            f"{task} zero-shot": zero[task]["auroc"],
            f"{task} target test": at_target[task]["auroc"],
        }
    return row


def tree(cfg: DictConfig, source: Path, target: Path) -> dict:
    """The tree's AUROCs on the same splits (deterministic: one fit per site and task)."""
    from sklearn.metrics import roc_auc_score

    from fedclif.shared.evaluation.baseline import features, load_dataset, make_model
    from fedclif.shared.evaluation.baseline import target as labelled
    from fedclif.shared.tokens.labels import TASKS as LABEL
    from fedclif.shared.tokens.splits import assign_splits

    ds = {s: load_dataset(p) for s, p in (("source", source), ("target", target))}
    split = {s: assign_splits(d.patients, cfg.train.split) for s, d in ds.items()}
    row: dict[str, float] = {}
    for task in TASKS:
        fitted = {}
        for s, d in ds.items():
            idx, y = labelled(d, LABEL[task])
            train = split[s][idx] == "train"
            fitted[s] = make_model("gbm", 0).fit(features(d.X[idx[train]], "gbm"), y[train])
        for name, model, on, part in (
            ("source val", "source", "source", "val"),
            ("source test", "source", "source", "test"),
            ("zero-shot", "source", "target", None),
            ("target test", "target", "target", "test"),
        ):
            idx, y = labelled(ds[on], LABEL[task])
            keep = np.ones(idx.size, bool) if part is None else split[on][idx] == part
            p = fitted[model].predict_proba(features(ds[on].X[idx[keep]], "gbm"))[:, 1]
            row[f"{task} {name}"] = float(roc_auc_score(y[keep], p))
    return row


def main(argv: list[str] | None = None) -> None:
    from fedclif.shared.model.models import quiet_transformers
    from fedclif.simulations.commands import CACHE
    from fedclif.simulations.sites import SOURCE, TARGET, study_sites

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--study", type=Path, required=True, help="a study's --out (results.json)")
    p.add_argument("--cache", type=Path, default=CACHE, help="the study's site cache")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", choices=list(SETTINGS), help="these settings alone")
    p.add_argument(
        "--shares",
        type=float,
        nargs="*",
        default=[],
        help="also finetune at the target on these shares (< 1) of its training patients",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench-recipe"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_transformers()
    results = json.loads((a.study / "results.json").read_text())
    study = OmegaConf.create(results["config"])
    _, work = study_sites(study.study, a.cache)
    tokens = f"tokens-{results['tokenizers'][SOURCE][:16]}"
    source, target = work / SOURCE / tokens, work / TARGET / tokens
    rows = {"tree (GBM)": tree(study, source, target)}
    for name in a.only or SETTINGS:
        per_seed = []
        for seed in a.seeds:
            cfg = setting_config(study, SETTINGS[name], seed)
            out = a.out / name / f"s{seed}"
            per_seed.append(fm(cfg, source, target, out, a.out / "pretrained", tuple(a.shares)))
            log.info("%s seed %d: %s", name, seed, json.dumps(per_seed[-1]))
        rows[name] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "recipe.json").write_text(json.dumps(rows, indent=1))
    cols = [
        f"{t} {w}" for t in TASKS for w in ("source val", "source test", "zero-shot", "target test")
    ]
    print("| setting | " + " | ".join(cols) + " | pretrain s | finetune s |")
    print("|---" * (len(cols) + 3) + "|")
    for name, r in rows.items():
        secs = [f"{r[k]:.0f}" if k in r else "-" for k in ("pretrain_s", "finetune_s")]
        print(
            f"| {name} | "
            + " | ".join(f"{r[c]:.3f}" for c in cols)
            + " | "
            + " | ".join(secs)
            + " |"
        )
    if a.shares:  # the recovery curve: mean AUROC over the tasks at the target's test split
        shares = [f"share {f:g}" for f in (*a.shares, 1)]
        print("\n| setting | " + " | ".join(shares) + " |\n" + "|---" * (len(shares) + 1) + "|")
        for name, r in rows.items():
            if shares[0] in r:
                print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in shares) + " |")


if __name__ == "__main__":
    main()
