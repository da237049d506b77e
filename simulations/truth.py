"""Each synthetic stay's ceiling: the probability of its *recorded* outcome given everything
that exists by hour 24, in a truth file beside the site (`<site>.truth.parquet`) that no
site code reads. Scored as a model, it is the best any model could do on that site (the
ceiling the study reports, simulations/reference_arms.py): it knows the latent severity a
model can only estimate from the first day's noisy records.

Monte Carlo over what the generator draws after the first day (simulations/synth.py
`after_first_day_draws`: length-of-stay noise, late deterioration, death, facility), the
first day's latents held fixed, then through the same course and recording rules as the
tables: the ICU and ventilation intervals, hospice recorded for death, a missing
discharge. Only draws in which the stay lasts a day count (hour 24 shows the patient still
there, and shorter stays are never tokenized). ICU and ventilation count when they start
after hour 24 (a stay whose ICU or ventilation started in the first day is no example of
that task); ventilation is dated by its interval rather than by the charting times that
record it.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
from omegaconf import DictConfig

from fedclif.simulations.synth import (
    after_first_day,
    after_first_day_draws,
    chunk_stays,
    chunks,
    courses,
    hospice_probability,
    stay_ids,
)

# Draws per stay: the probabilities' Monte Carlo error is at most 0.5 / sqrt(DRAWS) (0.03).
DRAWS = 256
# Labels the truth file gives a probability for (shared/tokens/labels.py names).
LABELS = ("same_admission_death", "long_length_of_stay", "icu_admission", "imv_event")


def truth_path(site: str | Path) -> Path:
    """Where the truth of the site written to directory `site` lies: beside it."""
    site = Path(site)
    return site.with_name(f"{site.name}.truth.parquet")


def write_truth(cfg: DictConfig, stays: int, seed: int, site: str | Path) -> Path:
    """Write the truth of the site `synth.write_site(cfg, stays, seed, site)` writes."""
    path = truth_path(site)
    stay_truth(cfg, stays, seed).write_parquet(path)
    return path


def stay_truth(cfg: DictConfig, stays: int, seed: int, draws: int = DRAWS) -> pl.DataFrame:
    """Per stay (`hospitalization_id`): `p_<label>`, the probability of the recorded
    outcome given the first day, for each of LABELS; reproducible from the seed."""
    parts = []
    for k, first, n in chunks(cfg, stays):
        st, _ = chunk_stays(cfg, seed, k, n)
        mc = np.random.default_rng([seed, k, 3])
        hospice = hospice_probability(cfg, st.age)
        missing = float(cfg.documentation.missing_discharge)
        num = {label: np.zeros(n) for label in LABELS}
        den = {label: np.zeros(n) for label in LABELS}
        for _ in range(draws):
            s = replace(st)  # the first day's draws; the rest is redrawn below
            after_first_day(cfg, s, *after_first_day_draws(mc, mc, n))
            c = courses(s, cfg.policy)
            # Hour 24 shows the patient still there: only draws of a stay that lasts a
            # day count (shorter stays are never tokenized, so never scored).
            there = (s.los >= 1.0).astype(float)
            died = s.died.astype(float)
            # Death: recorded "Expired" unless hospice; a survivor's discharge may be
            # missing (no label), a death's never is.
            num["same_admission_death"] += there * died * (1 - hospice)
            den["same_admission_death"] += there * (1 - (1 - died) * missing)
            num["long_length_of_stay"] += there * (s.los > 7)
            den["long_length_of_stay"] += there
            for label, course in (("icu_admission", c["icu"]), ("imv_event", c["imv"])):
                start, _, on = course
                num[label] += there * (on & (start >= 1.0))
                den[label] += there * ~(on & (start < 1.0))
        cols = {f"p_{label}": num[label] / np.maximum(den[label], 1) for label in LABELS}
        parts.append(pl.DataFrame({"hospitalization_id": stay_ids(cfg, first, n), **cols}))
    return pl.concat(parts)
