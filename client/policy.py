"""The site's policy: what may leave this hospital, whatever a run asks. The site owns the
file (sections `policy`, configs/policy.yaml, and `site`, configs/site.yaml); the
coordinator's run config never changes it. Every request is checked against it before
any data is read, and a request looser than a rule is refused with the category `policy`
and the rule's name."""

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedclif.shared.config import CONFIG_DIR, load_tree
from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import SiteRefusal

POLICY_FILE = "policy.yaml"
SECTIONS = ("policy", "site")


def load_policy(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The site's policy tree (`policy` and `site`); None: the packaged defaults (a
    simulation's virtual sites). `overrides`: a proposed change, for review."""
    if path is not None and not Path(path).is_file():
        raise FedclifError(
            f"no site policy at {path}: write one with `fedclif site policy init DIR`, "
            "review it, and pass it to `fedclif site serve --policy`"
        )
    return load_tree(SECTIONS, (), path, overrides)


def write_policy(out: str | Path, overrides: list[str] = ()) -> Path:
    """DIR/policy.yaml: the packaged defaults with their comments (with `overrides`: the
    resolved values instead). Never replaces a policy that is there."""
    path = Path(out) / POLICY_FILE
    if path.exists():
        raise FedclifError(f"{path} exists: a site's policy is never overwritten")
    if overrides:
        text = "# A site policy (defaults, commented: `fedclif site policy init` alone).\n"
        text += OmegaConf.to_yaml(load_tree(SECTIONS, (), None, overrides))
    else:
        text = "\n".join(
            f"{section}:\n" + _indent((CONFIG_DIR / f"{section}.yaml").read_text())
            for section in SECTIONS
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _indent(text: str) -> str:
    return "".join(f"  {line}" if line.strip() else line for line in text.splitlines(True))


def work_dir(policy: DictConfig, site_name: str) -> Path:
    """The site's work directory (the policy's, else ~/.fedclif/<site name>), created
    with mode 0700."""
    path = Path(policy.policy.work_dir or Path.home() / ".fedclif" / site_name).expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # one that was there before keeps patient-level files private too
    return path.resolve()


def refuse(rule: str, relation: str) -> None:
    """Refuse a request by the rule it breaks and the policy's value (`relation`, e.g.
    "asked < 10"): never the request's own values, which a refusal would echo back
    (an interpolation resolved here, a value chosen to probe)."""
    raise SiteRefusal("policy", f"policy: {rule}: {relation}")


def check_stats(stats: DictConfig, policy: DictConfig) -> None:
    """The statistics a run asks for are at least as coarse as the policy allows."""
    p = policy.policy.stats
    if int(stats.min_cell_count) < int(p.min_cell_count):
        refuse("min_cell_count", f"asked < {p.min_cell_count}")
    if int(stats.sig_figs) > int(p.max_sig_figs):
        refuse("max_sig_figs", f"asked > {p.max_sig_figs}")
    if int(stats.min_open_code_count) < int(p.min_open_code_count):
        refuse("min_open_code_count", f"asked < {p.min_open_code_count}")
    if stats.seed is not None:  # the noise's seed is the site's secret
        refuse("stats.seed", "asked for one (the noise's seed is the site's)")


def check_training(train: DictConfig, policy: DictConfig) -> None:
    """The split a run asks for keeps test and validation sets large enough."""
    p = policy.policy.splits
    if float(train.split.test) < float(p.min_test):
        refuse("splits.min_test", f"asked < {p.min_test}")
    if float(train.split.val) < float(p.min_val):
        refuse("splits.min_val", f"asked < {p.min_val}")


def site_settings(train: DictConfig, policy: DictConfig) -> DictConfig:
    """A deployed site's training config: the run's, with what the site decides put in
    from its policy (its split's fractions and salt, its bootstrap's resamples)."""
    p = policy.policy
    train.split.test, train.split.val = float(p.splits.test), float(p.splits.val)
    train.split.salt = str(p.splits.salt)
    train.finetune.n_boot = train.probe.n_boot = int(p.metrics.n_boot)
    return train


def withhold(flat: dict, tasks: list[str], policy: DictConfig) -> tuple[dict, dict[str, str]]:
    """Flat evaluation metrics (`<task>_<metric>`) without the tasks measured on too few
    test stays or events of the rarer class, and why each was withheld. `num_examples`
    counts only what is kept (it would otherwise give the withheld tasks' sizes away)."""
    p = policy.policy.metrics
    reasons = {}
    for t in tasks:
        if f"{t}_n" not in flat:
            continue
        n, prevalence = flat[f"{t}_n"], flat[f"{t}_prevalence"]
        if n < int(p.min_test_stays):
            reasons[t] = f"policy: metrics.min_test_stays (fewer than {p.min_test_stays})"
        # Events of the rarer class, counted (rounded): 1 - 0.9 is 0.0999... in floats.
        elif round(min(prevalence, 1 - prevalence) * n) < int(p.min_events):
            reasons[t] = f"policy: metrics.min_events (fewer than {p.min_events})"
    kept = {k: v for k, v in flat.items() if not any(k.startswith(f"{t}_") for t in reasons)}
    # A reliability curve's bins hold calibration_n // BINS stays each: under the minimum
    # cell, a bin's observed rate comes close to a few patients' outcomes. (Imported here:
    # calibration brings scikit-learn, ~1 s, into every ClientApp process otherwise.)
    from fedclif.shared.evaluation.calibration import BINS

    cell = int(policy.policy.stats.min_cell_count)
    for t in tasks:
        for sfx in ("", "_recal"):
            if kept.get(f"{t}_calibration_n{sfx}", 0) // BINS < cell:
                for k in (f"{t}_reliability_predicted{sfx}", f"{t}_reliability_observed{sfx}"):
                    kept.pop(k, None)
    if reasons:
        kept["num_examples"] = sum(kept.get(f"{t}_n", 0) for t in tasks)
    return kept, reasons


def coarse_sizes(flat: dict, tasks: list[str], policy: DictConfig) -> dict:
    """Flat evaluation metrics with every size as coarse as the statistics' counts: each
    task's `n` and calibration sizes rounded down to the minimum cell, and its prevalence
    the share of a number of events rounded the same way (exact sizes, differenced across
    evaluations, would tell a few patients' outcomes)."""
    out = dict(flat)
    for t in tasks:
        if f"{t}_n" not in out:
            continue  # withheld, or not measured
        n = out[f"{t}_n"]
        events = round(out[f"{t}_prevalence"] * n)
        out[f"{t}_n"] = n_r = rounded(int(n), policy)
        out[f"{t}_prevalence"] = rounded(events, policy) / n_r if n_r else float("nan")
        for k in (f"{t}_calibration_n", f"{t}_calibration_n_recal"):
            if k in out:
                out[k] = rounded(int(out[k]), policy)
    out["num_examples"] = rounded(int(out["num_examples"]), policy)
    return out


def rounded(n: int, policy: DictConfig) -> int:
    """A size as it may leave: rounded down to a multiple of the policy's minimum cell
    count (the statistics' rule, for the sizes replies carry)."""
    k = int(policy.policy.stats.min_cell_count)
    return n // k * k


def coarse_count(n: int, what: str, policy: DictConfig) -> int:
    """`rounded(n)`, refused when `n` is under the minimum cell (nothing to round to)."""
    if n < int(policy.policy.stats.min_cell_count):
        refuse("stats.min_cell_count", f"fewer than {policy.policy.stats.min_cell_count} {what}")
    return rounded(n, policy)


def check_probe_training(n_stays: int, policy: DictConfig) -> None:
    if n_stays < int(policy.policy.probes.min_train_stays):
        refuse("probes.min_train_stays", f"fewer than {policy.policy.probes.min_train_stays}")


def check_dp(train: DictConfig, stage: str, n_patients: int, policy: DictConfig) -> bool:
    """Whether this round trains under DP-SGD, refusing what the policy's `dp` rules
    forbid (no DP where it is required, a delta above the site's bound: by default 1 /
    the patients of its training split, the unit DP-SGD protects)."""
    p = policy.policy.dp
    dp = float(train.dp.epsilon) > 0
    if p.required and not dp:
        refuse("dp.required", f"asked {stage} without DP-SGD")
    bound = float(p.max_delta) if p.max_delta is not None else 1.0 / max(n_patients, 1)
    if dp and float(train.dp.delta) > bound:
        # The default bound is the site's patient count: named, not given.
        limit = f"{bound:.3g}" if p.max_delta is not None else "1 / the training patients"
        refuse("dp.max_delta", f"asked > {limit}")
    return dp


def check_model(parameters: int, vocab: int, policy: DictConfig) -> None:
    p = policy.policy.model
    if parameters > int(p.max_parameters):
        refuse("model.max_parameters", f"asked > {p.max_parameters}")
    if vocab > int(p.max_vocab):
        refuse("model.max_vocab", f"asked > {p.max_vocab}")
