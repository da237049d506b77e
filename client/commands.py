"""`fedclif train pretrain|finetune|probe` and `fedclif forecast`: shells over client/."""

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
from omegaconf import DictConfig
from rich.table import Table

from fedclif.client.approval import APPROVED_FILE, approve, approved, write_shims
from fedclif.client.daemon import supernode_command
from fedclif.client.ledger import Ledger
from fedclif.client.policy import SECTIONS as POLICY_SECTIONS
from fedclif.client.policy import load_policy, work_dir, write_policy
from fedclif.shared.clif.site import load_site
from fedclif.shared.config import RESOLVED, add_arguments, load_config, load_tree, write_resolved
from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.flower import flower_env
from fedclif.shared.protocol.keys import write_site_keys
from fedclif.shared.tokens.events import OPEN_SEP
from fedclif.shared.tokens.stats import open_answers, open_floor, screen_rule
from fedclif.shared.ui import console, out, progress, step

TRAIN_FILES = (RESOLVED, "fedclif.json", "train_state.pt", "metrics.json", "probe.json")


def _quiet() -> None:
    # Imported here: torch loads only for these commands.
    from fedclif.shared.model.models import quiet_transformers

    quiet_transformers()


def _configs(args: argparse.Namespace, model: bool = False) -> DictConfig:
    """The `train` section (and `model`, for a model built here: pretraining), from
    `--config FILE` and `section.key=value` overrides."""
    return load_tree(("train", "model") if model else ("train",), (), args.config, args.overrides)


def _fresh_out(path: str, overwrite: bool) -> Path:
    """An output directory that is empty, or a previous fedclif output replaced on request:
    never silently mixes two runs, never deletes what fedclif did not write."""
    p = Path(path)
    if p.exists() and any(p.iterdir()):
        ours = any((p / f).exists() for f in TRAIN_FILES)
        if not ours:
            raise FedclifError(f"{p} exists and is not a fedclif output: choose another --out")
        if not overwrite:
            raise FedclifError(f"{p} already holds a run: pass --overwrite to replace it")
        shutil.rmtree(p)
    return p


def _bar(desc: str) -> tuple[object, Callable[[int, int, float], None]]:
    bar = progress()
    task = bar.add_task(desc, total=None)

    def update(done: int, total: int, loss: float) -> None:
        bar.update(task, completed=done, total=total, description=f"{desc} loss {loss:.3f}")

    return bar, update


def _load(path: str, cfg: DictConfig, full: bool = False, ids: list[str] | None = None):
    from fedclif.shared.model.sequences import load_site_data

    with step(f"loading {path}"):
        return load_site_data(path, cfg.split, full=full, ids=ids)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedclif.client.pretrain import pretrain
    from fedclif.shared.model.models import count_parameters

    config = _configs(args, model=True)
    cfg, model_cfg = config.train, config.model
    _quiet()
    out_dir = Path(args.out) if args.resume else _fresh_out(args.out, args.overwrite)
    write_resolved(config, out_dir)
    data = _load(args.data, cfg, full=True)
    n = count_parameters(model_cfg, data.tok, cfg.pretrain)
    console.print(
        f"{model_cfg.arch} ({model_cfg.size}): {n:,} parameters; vocabulary {len(data.tok.vocab):,}"
    )
    bar, update = _bar("pretraining")
    with bar:
        m = pretrain(data, model_cfg, cfg, out_dir, resume=args.resume, progress=update)
    console.print(f"pretrained on {data.name}; best checkpoint in {out_dir}")
    t = Table()
    t.add_column("")
    t.add_column("value", justify="right")
    rows = {
        k: m[k]
        for k in (
            "train_tokens",
            "steps",
            "unigram_entropy",
            "best_val_loss",
            "best_val_perplexity",
        )
    }
    rows |= {f"val {k} loss": v for k, v in m["val_losses"].items()}
    for k, v in rows.items():
        if v is not None:
            t.add_row(k, f"{v:,}" if isinstance(v, int) else f"{v:.3f}")
    out.print(t)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from fedclif.client.finetune import finetune

    config = _configs(args)
    cfg = config.train
    _quiet()
    out_dir = _fresh_out(args.out, args.overwrite)
    write_resolved(config, out_dir)
    data = _load(args.data, cfg)
    bar, update = _bar("finetuning")
    with bar:
        m = finetune(data, args.base, cfg, out_dir, progress=update)
    title = f"finetuned {args.base} on {data.name} (test split)"
    if m["dp"]:
        title += f"; DP-SGD spent ε = {m['dp']['epsilon']:.2f} (δ = {m['dp']['delta']:g})"
    out.print(_metrics_table(title, m["tasks"], "task"))
    return 0


def _metrics_table(title: str, rows: dict[str, dict], first: str) -> Table:
    t = Table(title=title, title_justify="left")
    cols = [c for c in ("auroc", "auprc", "f1") if any(c in r for r in rows.values())]
    for c in (first, "n", "prevalence", *(f"{c.upper()} [95% CI]" for c in cols)):
        t.add_column(c, justify="left" if c == first else "right")
    for name, r in rows.items():
        cells = [f"{r[c]:.3f} [{r[c + '_low']:.3f}, {r[c + '_high']:.3f}]" for c in cols]
        t.add_row(name, f"{r['n']:,}", f"{r['prevalence']:.3f}", *cells)
    return t


def cmd_probe(args: argparse.Namespace) -> int:
    from fedclif.client.probe import probe

    config = _configs(args)
    cfg = config.train
    _quiet()
    out_dir = _fresh_out(args.out, args.overwrite)
    write_resolved(config, out_dir)
    with step("representations, probes and trajectory metrics"):
        r = probe(args.model, args.train, args.test, cfg, out_dir, test_split=args.test_split)
    for site in dict.fromkeys(p["test"] for p in r["probes"]):
        rows = {p["label"]: p for p in r["probes"] if p["test"] == site}
        out.print(_metrics_table(f"probes trained at {r['train_site']}, at {site}", rows, "label"))
    console.print(f"results: {out_dir / 'probe.json'}, plot: {out_dir / 'probe.png'}")
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    from fedclif.client.forecast import forecast
    from fedclif.shared.model.models import load_model

    cfg = _configs(args).train
    _quiet()
    data = _load(args.data, cfg, full=True, ids=[args.id])
    model, _ = load_model(args.model)
    model.check_data(data.tok.hash, data.path, args.model)
    r = forecast(
        model, data, args.id, args.n, cfg.forecast, args.at, int(cfg.finetune.context), args.seed
    )
    t = Table(title=f"stay {args.id} after hour {args.at:g}", title_justify="left")
    for c in ("#", "forecast", "h", "actual", "h "):
        t.add_column(c, justify="right" if c.strip() in ("#", "h") else "left")
    for tok, h in r["history_tail"]:
        t.add_row("", f"[dim]{tok}[/]", f"[dim]{h:.1f}[/]", "", "")
    for i in range(max(len(r["forecast"]), len(r["actual"]))):
        f = r["forecast"][i] if i < len(r["forecast"]) else ("", None)
        a = r["actual"][i] if i < len(r["actual"]) else ("", None)
        hh = [f"{x[1]:.1f}" if x[1] is not None else "" for x in (f, a)]
        t.add_row(str(i + 1), f[0], hh[0], a[0], hh[1])
    out.print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the site's policy and data, then become its SuperNode (the site daemon)."""
    name = args.name or Path(args.data).resolve().name
    policy = load_policy(args.policy)
    cmd = supernode_command(
        Path(args.data),
        args.superlink,
        Path(args.ca),
        Path(args.key),
        name,
        Path(args.policy),
        args.port,
    )
    with step(f"checking {args.data}"):
        load_site(args.data, policy.site)  # a broken export fails here, not mid-run
    work = work_dir(policy, name)
    console.print(
        f"serving {args.data} to {args.superlink} under {args.policy} (work directory "
        f"{work}): only what the policy allows leaves"
    )
    for h, why in approved(work).items():
        console.print(f"accepting app bundle {h} ({why})")
    env = flower_env()
    env["PATH"] = os.pathsep.join([str(write_shims(work)), env["PATH"]])
    # The SuperNode replaces this process: signals reach it directly.
    os.execve(cmd[0], cmd, env)


def _site_work(policy: DictConfig, name: str | None) -> Path:
    """The work directory `site serve` uses under this policy: its `work_dir`, else one
    named for the site (which `--name` must then give)."""
    if policy.policy.work_dir is None and name is None:
        raise FedclifError(
            "the policy sets no work_dir, so the work directory is ~/.fedclif/<site name>: "
            "pass --name, the name `site serve` uses"
        )
    return work_dir(policy, str(name))


def cmd_approve(args: argparse.Namespace) -> int:
    """Let this site run another app bundle (after reviewing it)."""
    work = _site_work(load_policy(args.policy), args.name)
    h = approve(work, args.bundle, args.note)
    out.print(f"approved app bundle {h} at this site ({work / APPROVED_FILE})")
    return 0


def cmd_policy_init(args: argparse.Namespace) -> int:
    """Write the site's policy file: the defaults, commented, for the site to review."""
    path = write_policy(args.dir, args.overrides)
    out.print(f"wrote {path}: review it, then `fedclif site serve --policy {path} ...`")
    return 0


def cmd_policy_review(args: argparse.Namespace) -> int:
    """The free-text answers in this site's data, and which would leave under the policy
    (with `policy.stats.allow_open=[...]`: under a proposed allow-list). Only answers given
    by at least the policy's count floor are listed: the others stay home whatever the list
    says. Nothing leaves: this runs at the site, for its reviewer."""
    policy = load_policy(args.policy, args.overrides)
    rules = policy.policy.stats
    floor = open_floor(rules)
    with step(f"reading {args.data}"):
        answers = open_answers(load_site(args.data, policy.site), load_config("tokenizer"))
    allowed = set(rules.allow_open)
    shown = answers.filter(pl.col("patients") >= floor)
    rows = [
        {**r, "screen": screen_rule(r["answer"]), "leaves": r["answer"] in allowed}
        for r in shown.iter_rows(named=True)
    ]
    t = Table(
        title=f"free-text answers of {floor} or more patients at {args.data}", title_justify="left"
    )
    for c in ("assessment", "answer", "patients", "reads like", "leaves"):
        t.add_column(c, justify="right" if c == "patients" else "left")
    for r in rows:
        verdict = "[green]yes[/]" if r["leaves"] else "no: not allowed"
        assessment = r["code"].removesuffix(f"{OPEN_SEP}{r['answer']}")
        t.add_row(assessment, r["answer"], str(r["patients"]), r["screen"] or "", verdict)
    out.print(t)
    out.print(
        f"{answers.height - shown.height} more answer(s) of fewer than {floor} patients stay "
        "home whatever the list says. To let an answer leave, add it exactly to "
        "policy.stats.allow_open in the policy file; check those that read like a name, a "
        "date or a record first."
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"floor": floor, "answers": rows}, indent=1))
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    """What this site has spent of its DP budget, per run and round."""
    policy = load_policy(args.policy)
    ledger = Ledger(_site_work(policy, args.name))
    t = Table(title=f"DP-SGD spent at this site ({ledger.path})", title_justify="left")
    for c in ("run", "stage", "round", "epsilon", "delta", "status", "when"):
        t.add_column(c, justify="right" if c in ("round", "epsilon", "delta") else "left")
    for e in ledger.entries():
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["time"]))
        t.add_row(
            str(e["run"]),
            e["stage"],
            str(e["round"]),
            f"{e['epsilon']:.4g}",
            f"{e['delta']:.2g}",
            e["status"],
            when,
        )
    out.print(t)
    limit = float(policy.policy.dp.max_epsilon_lifetime)
    out.print(
        f"total epsilon {ledger.spent():.4g} of the lifetime {limit:.4g} "
        "(rounds summed: basic composition, an upper bound)"
    )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """The site's authentication key pair, made at the site: the private key never leaves."""
    private, public = write_site_keys(args.out)
    out.print(f"wrote {private} (private, mode 600: it stays here) and {public}")
    out.print(f"next: send {public} to the coordinator (`fedclif site register`)")
    return 0


def register(sub, groups: dict, add: Callable) -> None:
    """Add the training commands and `site serve` to the `fedclif` parser."""
    policy = add(groups["site"], "policy", None, "the site's policy: what may leave")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    p = add(psub, "init", cmd_policy_init, "write DIR/policy.yaml (the defaults, commented)")
    p.add_argument("dir")
    add_arguments(p, POLICY_SECTIONS, "policy.stats.min_cell_count=20 site.timezone=UTC")
    p = add(psub, "review", cmd_policy_review, "the free-text answers that would leave, and why")
    p.add_argument("--policy", help="the site's policy file (default: the packaged one)")
    p.add_argument("--data", required=True, help="the site's CLIF directory")
    p.add_argument("--json", help="also write the answers as JSON here")
    add_arguments(p, POLICY_SECTIONS, "'policy.stats.allow_open=[Yes,No,calm]' (a proposal)")
    p = add(groups["site"], "ledger", cmd_ledger, "the DP budget this site has spent")
    p.add_argument("--policy", required=True, help="the site's policy file")
    p.add_argument("--name", help="site name (when the policy sets no work_dir)")
    p = add(groups["site"], "approve", cmd_approve, "let this site run another app bundle")
    p.add_argument("bundle", help="the reviewed .fab file, or its SHA-256")
    p.add_argument("--policy", required=True, help="the site's policy file")
    p.add_argument("--name", help="site name (when the policy sets no work_dir)")
    p.add_argument("--note", default="approved by the site", help="why (kept with the hash)")
    p = add(groups["site"], "keygen", cmd_keygen, "make this site's key pair (site.key stays)")
    p.add_argument("--out", required=True, help="directory for site.key and site.pub")
    p = add(groups["site"], "serve", cmd_serve, "the site daemon: a SuperNode next to the data")
    p.add_argument("--data", required=True, help="the site's CLIF directory")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--ca", required=True, help="CA certificate (ca.crt from the coordinator)")
    p.add_argument("--key", required=True, help="this site's private key (site.key)")
    p.add_argument("--name", help="site name (default: the data directory's name)")
    p.add_argument(
        "--policy", required=True, help="the site's policy file (`fedclif site policy init`)"
    )
    p.add_argument("--port", type=int, default=9094, help="local SuperNode API port")

    def common(p: argparse.ArgumentParser) -> None:
        add_arguments(
            p,
            ("train", "model"),
            "train.finetune.peft=lora train.dp.epsilon=2 "
            "model.size=small (model: pretraining only)",
        )

    tr = add(sub, "train", None, "train at one site: pretrain, finetune, probe")
    tsub = tr.add_subparsers(dest="train_command", required=True)
    p = add(
        tsub,
        "pretrain",
        cmd_pretrain,
        "pretraining on full timelines: next-token (and train.pretrain.objectives)",
    )
    p.add_argument("--data", required=True, help="tokenized site (fedclif site tokenize --out)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    common(p)
    p = add(tsub, "finetune", cmd_finetune, "multitask prompted finetuning on the first 24 h")
    p.add_argument("--data", required=True)
    p.add_argument("--from", dest="base", required=True, help="pretrained checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    common(p)
    p = add(tsub, "probe", cmd_probe, "linear probes and trajectory metrics of a frozen model")
    p.add_argument("--model", required=True, help="checkpoint")
    p.add_argument("--train", required=True, help="tokenized site the probes are fitted on")
    p.add_argument("--test", nargs="*", default=[], help="tokenized sites to evaluate at")
    p.add_argument(
        "--test-split", default="test", choices=["test", "all"], help="stays used at --test sites"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    common(p)
    p = add(sub, "forecast", cmd_forecast, "generate a stay's next events, beside the real ones")
    p.add_argument("--model", required=True, help="checkpoint")
    p.add_argument("--data", required=True, help="tokenized site")
    p.add_argument("--id", required=True, help="hospitalization_id")
    p.add_argument("-n", type=int, default=20, help="tokens to generate")
    p.add_argument("--at", type=float, default=24.0, help="hours of the stay given as history")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the forecast as JSON here")
    common(p)
