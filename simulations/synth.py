"""Synthetic CLIF 2.1 sites with known, controllable differences.

The causal model is written down in `simulations/README.md`. In short: each stay has a
latent severity that moves linearly in time (its admission value and daily slope are
drawn from the case mix), plus fixed organ offsets (cardiovascular, respiratory, renal,
infection). The care policy turns severity into a care process (ICU while acuity is above
a threshold, intubation and vasopressors likewise, charting and lab frequency by unit);
measurements are noisy functions of the organ severities at their time, seen through the
site's instruments; outcomes follow from peak severity, age and comorbidity, and the
site's documentation decides how they are recorded.

Everything is drawn with numpy, a chunk of stays at a time, from a generator seeded by
(seed, chunk index): the same seed and config give the same bytes, and memory does not
grow with the number of stays.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import yaml
from omegaconf import DictConfig

from fedclif.shared.clif.schema import REQUIRED_TABLES, clifpy_root, load_schemas
from fedclif.shared.config import CONFIG_DIR, load_config
from fedclif.shared.errors import FedclifError

PRESET_DIR = CONFIG_DIR / "sim" / "sites"
_US_PER_DAY = 86_400_000_000

# Labs: (category, panel, median, log-normal?, organ, effect per unit severity, sd, digits).
LABS = (
    ("sodium", "bmp", 138.0, False, "renal", -0.7, 2.5, 0),
    ("potassium", "bmp", 4.1, False, "renal", 0.25, 0.45, 1),
    ("chloride", "bmp", 102.0, False, "renal", -1.0, 4.0, 0),
    ("bicarbonate", "bmp", 24.0, False, "cardio", -2.0, 3.0, 0),
    ("bun", "bmp", 20.0, True, "renal", 0.45, 0.45, 0),
    ("creatinine", "bmp", 1.0, True, "renal", 0.5, 0.4, 1),
    ("glucose_serum", "bmp", 125.0, True, "infect", 0.1, 0.35, 0),
    ("calcium_total", "bmp", 8.6, False, "renal", -0.25, 0.6, 1),
    ("hemoglobin", "cbc", 9.5, False, "cardio", -0.5, 1.7, 1),
    ("wbc", "cbc", 9.0, True, "infect", 0.3, 0.45, 1),
    ("platelet_count", "cbc", 190.0, True, "infect", -0.2, 0.5, 0),
    ("ph", "blood_gas", 7.38, False, "resp", -0.04, 0.06, 2),
    ("pco2", "blood_gas", 40.0, False, "resp", 4.0, 7.0, 0),
    ("po2", "blood_gas", 95.0, True, "resp", -0.2, 0.35, 0),
    ("lactate", "blood_gas", 1.1, True, "cardio", 0.4, 0.4, 1),
)
# Physiological limits the generated vital signs stay within.
_VITAL_LIMITS = {
    "heart_rate": (25, 220),
    "sbp": (50, 250),
    "dbp": (20, 150),
    "map": (30, 180),
    "respiratory_rate": (4, 55),
    "spo2": (60, 100),
    "temp_c": (33.5, 42),
}
_FACILITIES = (
    "Skilled Nursing Facility (SNF)",
    "Acute Inpatient Rehab Facility",
    "Long Term Care Hospital (LTACH)",
)
_SURVIVOR_DISCHARGE = {
    "Home": 0.66,
    "Skilled Nursing Facility (SNF)": 0.17,
    "Acute Inpatient Rehab Facility": 0.07,
    "Long Term Care Hospital (LTACH)": 0.04,
    "Against Medical Advice (AMA)": 0.02,
    "Acute Care Hospital": 0.02,
    "Psychiatric Hospital": 0.01,
    "Hospice": 0.01,
}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """`configs/sim/site.yaml` with a preset and `key=value` overrides on top."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FedclifError(f"no site preset {name!r}; presets: {', '.join(preset_names())}")
    cfg = load_config("sim/site", path, overrides)
    for key in ("race", "ethnicity", "admission_type"):
        probs = np.array(list(cfg.case_mix[key].values()), dtype=float)
        if (probs < 0).any() or probs.sum() <= 0:
            raise FedclifError(f"case_mix.{key} must be non-negative shares, got {probs}")
    missing = set(cfg.documentation.missing_tables) & set(REQUIRED_TABLES)
    if missing:
        raise FedclifError(f"documentation.missing_tables cannot drop required tables: {missing}")
    return cfg


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# Free-text SBT failure reasons and their shares: the last four identify someone.
FREE_TEXT_ANSWERS = {
    "tachypnea": 0.35,
    "desaturation": 0.25,
    "agitation": 0.2,
    "hemodynamic instability": 0.1,
    "per Dr. Alvarez": 0.03,
    "see note 2184-03-17": 0.03,
    "MRN 00482913": 0.02,
    "call 312-555-0186": 0.02,
}


def _choice(rng: np.random.Generator, shares: Mapping, n: int) -> pl.Series:
    keys = list(shares.keys())
    p = np.array([float(shares[k]) for k in keys])
    return pl.Series(keys).gather(rng.choice(len(keys), n, p=p / p.sum()))


def _interval(a0: np.ndarray, slope: np.ndarray, thr: float, los: np.ndarray):
    """Where a linear path a0 + slope*t exceeds `thr` within [0, los]: (start, end, any)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where(slope != 0, (thr - a0) / slope, np.inf)
    above0 = a0 > thr
    start = np.where(above0, 0.0, np.where(slope > 0, cross, np.inf))
    end = np.where(above0, np.where(slope < 0, cross, np.inf), np.where(slope > 0, np.inf, 0))
    start, end = np.clip(start, 0, los), np.clip(end, 0, los)
    return start, end, end > start


def _span(a: tuple, b: tuple) -> tuple:
    """The smallest (start, end, any) interval per stay covering intervals a and b."""
    (s, e, on), (s2, e2, on2) = a, b
    return (
        np.where(on2, np.where(on, np.minimum(s, s2), s2), s),
        np.where(on2, np.where(on, np.maximum(e, e2), e2), e),
        on | on2,
    )


@dataclass
class Stays:
    """Per-stay draws of one chunk (arrays of length n): the first day's, then (set by
    `after_first_day`) the course after it, then the admission times."""

    n: int
    patient: np.ndarray
    age: np.ndarray
    comorb: np.ndarray
    resp_pheno: np.ndarray
    s0: np.ndarray
    slope: np.ndarray
    off: dict[str, np.ndarray]
    # The patient's last stay (only it can end in death).
    last: np.ndarray
    los: np.ndarray = None  # days
    died: np.ndarray = None
    # Late deterioration: severity + `jump` over [det_start, det_end] days (0: none).
    jump: np.ndarray = None
    det_start: np.ndarray = None
    det_end: np.ndarray = None
    # Survivors bound for a facility (SNF, rehab, LTACH): where they are discharged to.
    facility: np.ndarray = None
    # Days until medically ready for discharge (los less any wait for a facility bed).
    ready: np.ndarray = None
    admit_us: np.ndarray = None  # admission time, microseconds since epoch

    def organ(self, name: str, idx: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Severity of an organ system for events of stays `idx` at times `t` (days).

        Bounded below: a recovered patient is healthy, not ever healthier; held where it
        was once medically ready (waiting for a bed)."""
        t = np.minimum(t, self.ready[idx])
        bump = np.where((t >= self.det_start[idx]) & (t < self.det_end[idx]), self.jump[idx], 0.0)
        return np.maximum(self.s0[idx] + self.slope[idx] * t + self.off[name][idx] + bump, -2.0)


def _logit(share: float) -> float:
    return float(np.log(share / (1 - share))) if 0 < share < 1 else np.inf * (share - 0.5)


def chunk_stays(
    cfg: DictConfig, seed: int, index: int, n: int
) -> tuple[Stays, np.random.Generator]:
    """Chunk `index`'s n stays, and its generator (the chunk's tables draw on from it)."""
    rng = np.random.default_rng([seed, index])
    return _draw_stays(cfg, rng, n, np.random.default_rng([seed, index, 2])), rng


def _draw_stays(
    cfg: DictConfig, rng: np.random.Generator, n: int, late: np.random.Generator
) -> Stays:
    """The latent draws of n stays; `late` (its own stream) draws the late deterioration
    and the discharge destination, so those knobs move no other draw."""
    cm = cfg.case_mix
    per_patient = 1 + rng.poisson(float(cm.readmissions_per_patient), n)
    patient = np.repeat(np.arange(n), per_patient)[:n]
    first = np.r_[True, patient[1:] != patient[:-1]]
    base = np.maximum.accumulate(np.where(first, np.arange(n), 0))  # patient's first stay
    age = np.round(np.clip(rng.normal(cm.age_mean, cm.age_sd, n), 18, 95)[base]).astype(np.int64)
    comorb = rng.poisson(0.6 + 0.03 * np.maximum(age - 50, 0))
    resp = rng.random(n) < float(cm.respiratory_share)
    s0 = rng.normal(cm.severity_mean + 0.015 * (age - 63) + 0.2 * comorb + 0.3 * resp, 1.0)
    slope = rng.normal(-0.25, 0.25, n)
    off = {
        "cardio": rng.normal(0, 0.6, n),
        "resp": 1.0 * resp + rng.normal(0, 0.5, n),
        "renal": 0.2 * comorb + rng.normal(0, 0.6, n),
        "infect": 0.4 * resp + rng.normal(0, 0.6, n),
    }
    # Only a patient's last stay can end in death.
    last = np.r_[patient[1:] != patient[:-1], True]
    st = Stays(n, patient, age, comorb, resp, s0, slope, off, last=last)
    after_first_day(cfg, st, *after_first_day_draws(rng, late, n))
    start = datetime(int(cfg.era.start_year), 1, 1, tzinfo=UTC).timestamp()
    end = datetime(int(cfg.era.end_year), 12, 1, tzinfo=UTC).timestamp()
    u = rng.uniform(0, 1, n)
    gap_days = np.where(rng.random(n) < 0.55, rng.uniform(1, 30, n), 30 + rng.exponential(150, n))
    step = np.where(first, 0.0, gap_days) + np.r_[0.0, st.los[:-1]]
    cum = np.cumsum(step * _US_PER_DAY)
    offset = cum - cum[base]
    # A patient's stays follow one another (gaps of days to months); the first admission is
    # placed so that the whole sequence fits in the era where it can.
    starts = np.flatnonzero(first)
    span = np.repeat(np.maximum.reduceat(offset, starts), np.diff(np.r_[starts, n]))
    room = np.maximum((end - start) * 1e6 - span, 0)
    st.admit_us = (start * 1e6 + u[base] * room[base] + offset).astype(np.int64)
    return st


def after_first_day_draws(
    rng: np.random.Generator, late: np.random.Generator, n: int
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """What is drawn after the first day, in the generator's order (`late`: the stream of
    the deterioration and the discharge destination): length-of-stay noise, five late
    uniforms, the death uniform. The truth file redraws them (simulations/truth.py)."""
    los_noise = rng.normal(0, 0.45, n)
    return los_noise, [late.random(n) for _ in range(5)], rng.random(n)


def hospice_probability(cfg: DictConfig, age: np.ndarray) -> np.ndarray:
    """A dying patient's chance of a hospice discharge, recorded as "Hospice" rather than
    "Expired": mostly the old (comfort care)."""
    logit = _logit(float(cfg.outcomes.hospice_share))
    return _sigmoid(logit + float(cfg.outcomes.hospice_age_slope) * (age - 70))


def stay_ids(cfg: DictConfig, first: int, n: int, kind: str = "H") -> pl.Series:
    """The ids of a chunk's stays ("H") or patients ("P") from stay `first` on."""
    return pl.Series([f"{cfg.hospital_id}-{kind}{first + i:08d}" for i in range(n)])


def after_first_day(
    cfg: DictConfig,
    st: Stays,
    los_noise: np.ndarray,
    u_late: list[np.ndarray],
    u_death: np.ndarray,
) -> None:
    """The course of stays `st` after their first day, from its draws: length of stay, late
    deterioration, death, discharge to a facility (sets them on `st`). The generator calls
    it once; the truth file (simulations/truth.py) many times, each with fresh draws and the
    first day held fixed."""
    out, age, s0, slope, off = cfg.outcomes, st.age, st.s0, st.slope, st.off
    # Length of stay: sicker and slower-recovering patients stay longer (the slope is
    # barely visible in the first 24 h, which keeps the task hard).
    log_los = (
        np.log(out.los_median_days)
        + 0.5 * s0
        + 0.2 * np.maximum(off["cardio"], off["resp"])
        - 1.2 * (slope + 0.25)
        + los_noise
    )
    los = np.clip(np.exp(log_los) + st.resp_pheno * float(out.respiratory_extra_days), 0.25, 60.0)
    # Late deterioration (hospital-acquired infection, a failing lung): likelier with
    # infection, respiratory and admission severity, all visible in the first 24 h; from
    # `onset` (after the first day) for `days`, every organ's severity is `jump` higher,
    # and the stay lasts until some days after it.
    d = cfg.case_mix.deterioration
    u_det, u_gap, u_len, u_rec, u_fac = u_late
    risk = _logit(float(d.share)) + 0.8 * off["infect"] + 0.6 * off["resp"] + 0.4 * s0
    det = u_det < _sigmoid(risk)
    st.det_start = np.where(det, 1.0 + float(d.onset_days) * -np.log1p(-u_gap), np.inf)
    lo, hi = (float(x) for x in d.episode_days)
    st.det_end = st.det_start + lo + (hi - lo) * u_len
    st.jump = np.where(det, float(d.jump), 0.0)
    los = np.where(det, np.maximum(los, np.minimum(st.det_end + 1 + 3 * u_rec, 60.0)), los)
    # Death follows the worst point of the course through the failing organ system: the
    # lungs in the respiratory phenotype, the circulation otherwise.
    peak = np.maximum(s0, s0 + slope * los)
    w_resp = np.where(st.resp_pheno, float(out.respiratory_death_weight), 0.1)
    organ_peak = peak + w_resp * off["resp"] + (1 - w_resp) * off["cardio"]
    p_death = _sigmoid(
        out.death_intercept
        + out.death_severity * organ_peak
        + 0.03 * (age - 63)
        + 0.2 * st.comorb
        + float(d.death_logit) * det
    )
    died = u_death < p_death
    # Survivors go to a facility (SNF, rehab, LTACH) more often when old; where beds are
    # scarce they wait `placement_delay_days` for one, medically ready, on the ward.
    facility_share = sum(float(_SURVIVOR_DISCHARGE[k]) for k in _FACILITIES)
    p_fac = _sigmoid(_logit(facility_share) + float(out.facility_age_slope) * (age - 65))
    st.facility = (u_fac < p_fac) & ~(died & st.last)
    st.ready = los
    st.los = los + float(out.placement_delay_days) * st.facility
    st.died = died & st.last


def courses(st: Stays, policy: DictConfig) -> dict[str, tuple]:
    """Each stay's ICU, ventilation and vasopressor interval (start, end, any; days), from
    its severity path; ventilation lengthens the stay by 1.5 days (sets `st.los`,
    `st.ready`)."""
    acuity = st.s0 + 0.5 * np.maximum(st.off["cardio"], st.off["resp"])
    icu = _course(st, acuity, float(policy.icu_threshold))
    imv = _course(st, st.s0 + st.off["resp"], float(policy.imv_threshold))
    vaso = _course(st, st.s0 + st.off["cardio"], float(policy.vasopressor_threshold))
    # Ventilation and pressors happen in the ICU: the ICU stay covers them.
    for other in (imv, vaso):
        icu = _span(icu, other)
    # Intubated stays last longer (the intervals above end where they did).
    st.los = st.los + np.where(imv[2], 1.5, 0.0)
    st.ready = st.ready + np.where(imv[2], 1.5, 0.0)
    return {"icu": icu, "imv": imv, "vaso": vaso}


def _course(st: Stays, a0: np.ndarray, thr: float) -> tuple:
    """Where severity path `a0 + slope * t` (plus a late deterioration's jump during its
    episode) exceeds `thr`: one interval, the span of both when there are two (a patient
    who deteriorates again stays where they were)."""
    s2, e2, _ = _interval(a0 + st.jump, st.slope, thr, st.ready)
    s2, e2 = np.maximum(s2, st.det_start), np.minimum(e2, st.det_end)
    return _span(_interval(a0, st.slope, thr, st.ready), (s2, e2, e2 > s2))


def _grid(
    st: Stays,
    every_h: np.ndarray,
    start: np.ndarray | None = None,
    stop: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
):
    """Regular times (days) every `every_h` hours per stay within [start, stop]."""
    start = np.zeros(st.n) if start is None else start
    stop = st.los if stop is None else stop
    step = every_h / 24.0
    count = np.maximum(np.floor((stop - start) / step).astype(np.int64) + 1, 0)
    count = np.where(stop > start, count, 0)
    idx = np.repeat(np.arange(st.n), count)
    pos = np.arange(idx.size) - np.repeat(np.cumsum(count) - count, count)
    t = start[idx] + pos * np.broadcast_to(step, (st.n,))[idx]
    if rng is not None:  # charting is not on the hour
        t = t + rng.uniform(0, 0.4, t.size) * np.broadcast_to(step, (st.n,))[idx]
    keep = t <= stop[idx]
    return idx[keep], t[keep]


def _where(mask: np.ndarray, value: str) -> pl.Series:
    """`value` where mask, else null, as a string column."""
    return pl.select(pl.when(pl.Series(mask)).then(pl.lit(value))).to_series()


_POLARS_TYPE = {
    "VARCHAR": pl.String,
    "DATETIME": pl.Datetime("us", "UTC"),
    "DATE": pl.Date,
    "INT": pl.Int64,
    "DOUBLE": pl.Float64,
    "FLOAT": pl.Float64,
}


def _complete(name: str, df: pl.DataFrame) -> pl.DataFrame:
    """All CLIF 2.1 columns of the table in schema order, the ones not generated as nulls."""
    cols = load_schemas()[name].columns
    return df.select(
        pl.col(c).cast(_POLARS_TYPE[col.dtype])
        if c in df.columns
        else pl.lit(None, _POLARS_TYPE[col.dtype]).alias(c)
        for c, col in cols.items()
    )


def _ts(st: Stays, idx: np.ndarray, t_days: np.ndarray) -> pl.Series:
    us = st.admit_us[idx] + np.round(t_days * _US_PER_DAY / 60e6).astype(np.int64) * 60_000_000
    return pl.Series(us).cast(pl.Datetime("us", "UTC"))


class _Chunk:
    """Draws every table of one chunk of stays."""

    def __init__(self, cfg: DictConfig, seed: int, index: int, first: int, n: int):
        self.cfg = cfg
        # Its own stream: free text (documentation.free_text_share) moves no other draws.
        self.text_rng = np.random.default_rng([seed, index, 1])
        self.first = first
        self.st, self.rng = chunk_stays(cfg, seed, index, n)
        c = courses(self.st, cfg.policy)
        self.icu, self.imv, self.vaso = c["icu"], c["imv"], c["vaso"]
        self._hosp_ids, self._patient_ids = self._ids("H"), self._ids("P")

    def _ids(self, kind: str) -> pl.Series:
        return stay_ids(self.cfg, self.first, self.st.n, kind)

    def hosp_id(self, idx: np.ndarray) -> pl.Series:
        return self._hosp_ids.gather(idx)

    def patient_id(self, p: np.ndarray) -> pl.Series:
        return self._patient_ids.gather(p)

    def in_icu(self, idx: np.ndarray, t: np.ndarray) -> np.ndarray:
        s, e, on = self.icu
        return on[idx] & (t >= s[idx]) & (t < e[idx])

    def charted(self, ward_h: float, icu_h: float, rng_jitter: bool = True):
        """Times charted every `ward_h` hours on the ward and `icu_h` in the ICU."""
        fine = min(ward_h, icu_h)
        idx, t = _grid(self.st, np.full(self.st.n, fine), rng=self.rng if rng_jitter else None)
        k = max(1, round(ward_h / fine))
        pos = np.arange(idx.size) - np.searchsorted(idx, idx)
        keep = self.in_icu(idx, t) if icu_h < ward_h else np.ones(idx.size, bool)
        keep |= pos % k == 0
        return idx[keep], t[keep]

    # --- tables ---------------------------------------------------------------------

    def patient_hospitalization(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        st, cfg, rng = self.st, self.cfg, self.rng
        n = st.n
        is_first = np.r_[True, st.patient[1:] != st.patient[:-1]]
        pats = st.patient[is_first]
        m = pats.size
        discharge_us = st.admit_us + (st.los * _US_PER_DAY).astype(np.int64)
        died_pat = np.zeros(m, bool)
        died_pat[(np.cumsum(is_first) - 1)[st.died]] = True
        death_us = np.zeros(m, np.int64)
        death_us[died_pat] = discharge_us[st.died]  # a patient dies at most once (last stay)
        birth_us = st.admit_us[is_first] - (st.age[is_first] * 365.25 * _US_PER_DAY).astype(
            np.int64
        )
        utc = pl.Datetime("us", "UTC")
        patient = pl.DataFrame(
            {
                "patient_id": self.patient_id(pats),
                "race_category": _choice(rng, cfg.case_mix.race, m),
                "ethnicity_category": _choice(rng, cfg.case_mix.ethnicity, m),
                "sex_category": np.where(rng.random(m) < cfg.case_mix.female, "Female", "Male"),
                "birth_date": pl.Series(birth_us).cast(utc).dt.date(),
                "death_dttm": pl.Series(death_us).cast(utc),
                "language_category": np.full(m, "English"),
            }
        ).with_columns(pl.when(pl.Series(died_pat)).then(pl.col("death_dttm")).alias("death_dttm"))
        # Destinations by their shares, within the facilities for those bound there and
        # within the rest for the others (one uniform per stay, as before either way).
        keys = np.array(list(_SURVIVOR_DISCHARGE), dtype=object)
        shares = np.array(list(_SURVIVOR_DISCHARGE.values()))
        is_fac = np.isin(keys, _FACILITIES)
        u = rng.random(n)
        discharge = np.empty(n, dtype=object)
        for group, rows in ((is_fac, st.facility), (~is_fac, ~st.facility)):
            cdf = np.cumsum(np.where(group, shares, 0.0))
            discharge[rows] = keys[
                np.minimum(cdf.searchsorted(u[rows] * cdf[-1], "right"), len(keys) - 1)
            ]
        # A site that discharges the dying to hospice records their deaths as "Hospice".
        p_hospice = hospice_probability(cfg, st.age[st.died])
        u_hospice = rng.random(n)  # one per stay: how many die moves no later draw
        discharge[st.died] = np.where(u_hospice[st.died] < p_hospice, "Hospice", "Expired")
        missing = (rng.random(n) < cfg.documentation.missing_discharge) & ~st.died
        discharge[missing] = "Missing"
        hosp = pl.DataFrame(
            {
                "patient_id": self.patient_id(st.patient),
                "hospitalization_id": self.hosp_id(np.arange(n)),
                "admission_dttm": pl.Series(st.admit_us).cast(pl.Datetime("us", "UTC")),
                "discharge_dttm": pl.Series(discharge_us).cast(pl.Datetime("us", "UTC")),
                "age_at_admission": st.age,
                "admission_type_category": _choice(rng, cfg.case_mix.admission_type, n),
                "discharge_category": discharge,
            }
        )
        self.admission_type = hosp["admission_type_category"].to_numpy()
        return patient, hosp

    def adt(self) -> pl.DataFrame:
        st, cfg = self.st, self.cfg
        s, e, on = self.icu
        ed = self.admission_type == "ed"
        rows = [  # (stay idx, time in days, location)
            (np.flatnonzero(ed), -self.rng.uniform(2, 8, int(ed.sum())) / 24, "ed"),
            (np.flatnonzero(~(on & (s <= 0))), np.zeros(int((~(on & (s <= 0))).sum())), "ward"),
            (np.flatnonzero(on), s[on], "icu"),
        ]
        back = on & (e < st.los - 1e-6)
        rows.append((np.flatnonzero(back), e[back], "ward"))
        idx = np.concatenate([r[0] for r in rows])
        t = np.concatenate([r[1] for r in rows])
        loc = np.concatenate([np.full(r[0].size, r[2], dtype=object) for r in rows])
        order = np.lexsort((t, idx))
        idx, t, loc = idx[order], t[order], loc[order]
        nxt = np.r_[t[1:], 0.0]
        last = np.r_[idx[1:] != idx[:-1], True]
        out_t = np.where(last, st.los[idx], nxt)
        return pl.DataFrame(
            {
                "hospitalization_id": self.hosp_id(idx),
                "hospital_id": cfg.hospital_id,
                "hospital_type": cfg.hospital_type,
                "in_dttm": _ts(st, idx, t),
                "out_dttm": _ts(st, idx, out_t),
                "location_category": loc,
                "location_type": _where(loc == "icu", "general_icu"),
            }
        )

    def vitals(self) -> pl.DataFrame:
        st, pol, rng = self.st, self.cfg.policy, self.rng
        idx, t = self.charted(
            float(pol.vitals_interval_hours.ward), float(pol.vitals_interval_hours.icu)
        )
        m = idx.size
        card, resp, inf = (st.organ(o, idx, t) for o in ("cardio", "resp", "infect"))
        k = float(self.cfg.measurement.vital_noise)  # device precision
        sbp = 118 - 9 * card + rng.normal(0, 15 * k, m)
        dbp = 62 - 5 * card + rng.normal(0, 9 * k, m)
        values = {
            "heart_rate": 84 + 9 * card + rng.normal(0, 11 * k, m),
            "sbp": sbp,
            "dbp": dbp,
            "map": (sbp + 2 * dbp) / 3 + rng.normal(0, 2, m),
            "respiratory_rate": 18 + 2.5 * resp + rng.normal(0, 3.5 * k, m),
            "spo2": np.minimum(
                100,
                97.5
                - 1.5 * np.maximum(resp, 0)
                + rng.normal(0, 1.5 * k, m)
                + float(self.cfg.measurement.spo2_offset),
            ),
            "temp_c": 36.9 + 0.35 * inf + rng.normal(0, 0.4 * k, m),
        }
        for name, (lo, hi) in _VITAL_LIMITS.items():
            values[name] = np.clip(values[name], lo, hi)
        temp_every = np.arange(m) % 4 == 0
        frames = []
        for name, v in values.items():
            keep = temp_every if name == "temp_c" else np.ones(m, bool)
            digits = 1 if name == "temp_c" else 0
            frames.append(
                pl.DataFrame(
                    {
                        "hospitalization_id": self.hosp_id(idx[keep]),
                        "recorded_dttm": _ts(st, idx[keep], t[keep]),
                        "vital_category": name,
                        "vital_value": np.round(v[keep], digits),
                    }
                )
            )
        first = np.arange(st.n)
        weight = np.round(rng.lognormal(np.log(85), 0.25, st.n), 1)
        frames.append(
            pl.DataFrame(
                {
                    "hospitalization_id": self.hosp_id(first),
                    "recorded_dttm": _ts(st, first, np.full(st.n, 0.02)),
                    "vital_category": "weight_kg",
                    "vital_value": weight,
                }
            )
        )
        return pl.concat(frames)

    def labs(self) -> pl.DataFrame:
        st, pol, meas, rng = self.st, self.cfg.policy, self.cfg.measurement, self.rng
        ward, icu = float(pol.lab_panels_per_day.ward), float(pol.lab_panels_per_day.icu)
        idx, t = self.charted(24.0 / ward, 24.0 / icu, rng_jitter=True)
        gas = self.in_icu(idx, t) & (
            rng.random(idx.size) < float(pol.blood_gas_per_day_icu) / max(icu, 1e-9)
        )
        frames = []
        for name, panel, median, log, organ, effect, sd, digits in LABS:
            if name in _GASES:  # arterial or venous sampling, by site policy
                name = f"{name}_{pol.blood_gas}"
                if name not in _lab_units():
                    continue
            keep = gas if panel == "blood_gas" else np.ones(idx.size, bool)
            i, tt = idx[keep], t[keep]
            sev = st.organ(organ, i, tt)
            if log:
                v = np.exp(np.log(median) + effect * sev + rng.normal(0, sd, i.size))
            else:
                v = median + effect * sev + rng.normal(0, sd, i.size)
            v = (
                v
                * float(meas.lab_bias.get(name, 1.0))
                * (1 + rng.normal(0, float(meas.lab_noise), i.size))
            )
            v = np.round(v, digits)
            collect = tt + rng.uniform(0, 10, i.size) / 1440
            frames.append(
                pl.DataFrame(
                    {
                        "hospitalization_id": self.hosp_id(i),
                        "lab_order_dttm": _ts(st, i, tt),
                        "lab_collect_dttm": _ts(st, i, collect),
                        "lab_result_dttm": _ts(st, i, collect + rng.uniform(30, 90, i.size) / 1440),
                        "lab_order_category": panel,
                        "lab_category": name,
                        "lab_value": pl.Series(v).cast(pl.String),
                        "lab_value_numeric": v,
                        "reference_unit": _lab_units()[name],
                    }
                )
            )
        return pl.concat(frames)

    def respiratory_support(self) -> pl.DataFrame:
        st, pol, rng = self.st, self.cfg.policy, self.rng
        idx, t = self.charted(
            float(pol.vitals_interval_hours.ward), float(pol.vitals_interval_hours.icu)
        )
        s, e, on = self.imv
        vent = on[idx] & (t >= s[idx]) & (t < e[idx])
        resp = st.organ("resp", idx, t)
        low = ~vent & (resp > float(pol.imv_threshold) - 1.0)
        high_flow = low & st.resp_pheno[idx] & (resp > float(pol.imv_threshold) - 0.4)
        keep = vent | low
        idx, t, vent, resp, high_flow = idx[keep], t[keep], vent[keep], resp[keep], high_flow[keep]
        m = idx.size
        device = np.where(vent, "IMV", np.where(high_flow, "High Flow NC", "Nasal Cannula"))
        excess = np.maximum(resp - float(pol.imv_threshold), 0)
        fio2 = np.clip(0.4 + 0.15 * excess + rng.normal(0, 0.05, m), 0.21, 1.0)
        return pl.DataFrame(
            {
                "hospitalization_id": self.hosp_id(idx),
                "recorded_dttm": _ts(st, idx, t),
                "device_category": device,
                "mode_category": _where(vent, "Assist Control-Volume Control"),
                "tracheostomy": np.zeros(m, np.int64),
                "fio2_set": np.where(vent | high_flow, np.round(fio2, 2), np.nan),
                "lpm_set": np.where(
                    vent,
                    np.nan,
                    np.where(high_flow, rng.integers(40, 61, m), rng.integers(2, 7, m)),
                ).astype(float),
                "peep_set": np.where(vent, np.round(5 + 2 * np.maximum(resp, 0)), np.nan),
                "tidal_volume_set": np.where(vent, rng.integers(38, 51, m) * 10.0, np.nan),
                "resp_rate_set": np.where(vent, rng.integers(14, 21, m).astype(float), np.nan),
            }
        ).with_columns(
            pl.col(c).fill_nan(None)
            for c in ("fio2_set", "lpm_set", "peep_set", "tidal_volume_set", "resp_rate_set")
        )

    def medication_admin_continuous(self) -> pl.DataFrame:
        st, pol, rng = self.st, self.cfg.policy, self.rng
        frames = []
        for interval, med, group, dose_of in (
            (
                self.vaso,
                str(pol.vasopressor),
                "vasoactives",
                lambda i, t: 0.05 + 0.08 * np.maximum(st.organ("cardio", i, t), 0),
            ),
            (self.imv, str(pol.sedative), "sedation", lambda i, t: 20 + 5 * rng.random(i.size)),
        ):
            s, e, on = interval
            idx, t = _grid(st, np.full(st.n, 2.0), np.where(on, s, 0), np.where(on, e, 0))
            pos = np.arange(idx.size) - np.searchsorted(idx, idx)
            last = np.r_[idx[1:] != idx[:-1], True]
            action = np.where(pos == 0, "start", np.where(last, "stop", "going"))
            dose = np.where(action == "stop", 0.0, np.round(dose_of(idx, t), 3))
            frames.append(
                pl.DataFrame(
                    {
                        "hospitalization_id": self.hosp_id(idx),
                        "admin_dttm": _ts(st, idx, t),
                        "med_category": med,
                        "med_group": group,
                        "med_route_category": "iv",
                        "med_dose": dose,
                        "med_dose_unit": "mcg/kg/min",
                        "mar_action_category": action,
                    }
                )
            )
        return pl.concat(frames)

    def medication_admin_intermittent(self) -> pl.DataFrame:
        st, pol = self.st, self.cfg.policy
        infected = st.off["infect"] + st.s0 > 0.8
        stop = np.where(infected, np.minimum(st.los, 7.0), 0.0)
        idx, t = _grid(st, np.full(st.n, 12.0), np.where(infected, 0.25, 0.0), stop)
        frames = [
            pl.DataFrame(
                {
                    "hospitalization_id": self.hosp_id(idx),
                    "admin_dttm": _ts(st, idx, t + 0.01 * k),
                    "med_category": str(med),
                    "med_group": "CMS_sepsis_qualifying_antibiotics",
                    "med_route_category": "iv",
                    "med_dose": 1000.0,
                    "med_dose_unit": "mg",
                    "mar_action_category": "given",
                }
            )
            for k, med in enumerate(pol.antibiotics)
        ]
        return pl.concat(frames)

    def patient_assessments(self) -> pl.DataFrame:
        st, rng = self.st, self.rng
        idx, t = self.charted(8.0, 4.0)
        sev = st.organ("cardio", idx, t) - st.off["cardio"][idx]
        gcs = np.clip(
            np.round(15 - 2 * np.maximum(sev - 0.5, 0) + rng.normal(0, 0.7, idx.size)), 3, 15
        )
        s, e, on = self.imv
        vent = on[idx] & (t >= s[idx]) & (t < e[idx])
        cam = _sigmoid(sev - 1.5) > rng.random(idx.size)
        icu = self.in_icu(idx, t)
        frames = [
            pl.DataFrame(
                {
                    "hospitalization_id": self.hosp_id(idx),
                    "recorded_dttm": _ts(st, idx, t),
                    "assessment_category": "gcs_total",
                    "numerical_value": gcs,
                    "categorical_value": None,
                }
            ),
            pl.DataFrame(
                {
                    "hospitalization_id": self.hosp_id(idx[vent]),
                    "recorded_dttm": _ts(st, idx[vent], t[vent]),
                    "assessment_category": "RASS",
                    "numerical_value": -rng.integers(1, 5, int(vent.sum())).astype(float),
                    "categorical_value": None,
                }
            ),
            pl.DataFrame(
                {
                    "hospitalization_id": self.hosp_id(idx[icu]),
                    "recorded_dttm": _ts(st, idx[icu], t[icu]),
                    "assessment_category": "cam_total",
                    "numerical_value": None,
                    "categorical_value": np.where(cam[icu], "Positive", "Negative"),
                }
            ),
        ]
        # Free text, as CLIF's categorical_value allows (no permissible list): why a
        # spontaneous breathing trial failed, a few answers of which read like a name, a
        # date or a record number (a site's stats must keep those home, however common).
        share = float(self.cfg.documentation.free_text_share)
        if share > 0:
            sbt = np.flatnonzero(vent & (self.text_rng.random(idx.size) < share))
            text = _choice(self.text_rng, FREE_TEXT_ANSWERS, sbt.size)
            frames.append(
                pl.DataFrame(
                    {
                        "hospitalization_id": self.hosp_id(idx[sbt]),
                        "recorded_dttm": _ts(st, idx[sbt], t[sbt]),
                        "assessment_category": "sbt_fail_reason",
                        "numerical_value": None,
                        "categorical_value": text,
                    }
                )
            )
        return pl.concat(frames, how="vertical_relaxed")

    def position(self) -> pl.DataFrame:
        st = self.st
        idx, t = self.charted(8.0, 4.0)
        icu = self.in_icu(idx, t)
        idx, t = idx[icu], t[icu]
        prone = st.resp_pheno[idx] & (
            st.organ("resp", idx, t) > float(self.cfg.policy.imv_threshold) + 0.8
        )
        return pl.DataFrame(
            {
                "hospitalization_id": self.hosp_id(idx),
                "recorded_dttm": _ts(st, idx, t),
                "position_category": np.where(prone, "prone", "not_prone"),
            }
        )

    def code_status(self, hosp: pl.DataFrame) -> pl.DataFrame:
        st, rng = self.st, self.rng
        everyone = np.arange(st.n)
        dnr = rng.random(st.n) < _sigmoid(-2.5 + 0.06 * (st.age - 75) + 2.0 * st.died)
        idx = np.r_[everyone, everyone[dnr]]
        t = np.r_[np.full(st.n, 0.05), st.los[dnr] * rng.uniform(0.3, 0.95, int(dnr.sum()))]
        return pl.DataFrame(
            {
                "patient_id": hosp.get_column("patient_id").gather(idx),
                "start_dttm": _ts(st, idx, t),
                "code_status_category": np.where(np.arange(idx.size) < st.n, "Full", "DNR"),
            }
        )

    def hospital_diagnosis(self) -> pl.DataFrame:
        st = self.st
        codes = np.where(
            st.resp_pheno,
            "J96.01",
            np.where(
                st.off["infect"] > 0.6, "A41.9", np.where(st.off["renal"] > 0.8, "N17.9", "I50.9")
            ),
        )
        secondary = np.arange(st.n)[st.comorb > 0]
        return pl.DataFrame(
            {
                "hospitalization_id": self.hosp_id(np.r_[np.arange(st.n), secondary]),
                "diagnosis_code": np.r_[codes, np.full(secondary.size, "E11.9")],
                "diagnosis_code_format": "ICD10CM",
                "diagnosis_primary": np.r_[
                    np.ones(st.n, np.int64), np.zeros(secondary.size, np.int64)
                ],
                "poa_present": 1,
            }
        )

    def tables(self) -> dict[str, pl.DataFrame]:
        patient, hosp = self.patient_hospitalization()
        out = {
            "patient": patient,
            "hospitalization": hosp,
            "adt": self.adt(),
            "vitals": self.vitals(),
            "labs": self.labs(),
            "respiratory_support": self.respiratory_support(),
            "medication_admin_continuous": self.medication_admin_continuous(),
            "medication_admin_intermittent": self.medication_admin_intermittent(),
            "patient_assessments": self.patient_assessments(),
            "position": self.position(),
            "code_status": self.code_status(hosp),
            "hospital_diagnosis": self.hospital_diagnosis(),
        }
        for name in self.cfg.documentation.missing_tables:
            out.pop(str(name), None)
        return out


_GASES = ("ph", "pco2", "po2")


@cache
def _lab_units() -> dict[str, str]:
    """CLIF reference units of the labs clifpy knows, from its labs schema."""
    raw = yaml.safe_load((clifpy_root() / "schemas" / "2.1" / "labs_schema.yaml").read_text())
    return dict(raw["lab_reference_units"])


def generate(cfg: DictConfig, stays: int, seed: int) -> Iterator[dict[str, pl.DataFrame]]:
    """The site's tables, one chunk of stays at a time."""
    for k, first, n in chunks(cfg, stays):
        yield _Chunk(cfg, seed, k, first, n).tables()


def chunks(cfg: DictConfig, stays: int) -> Iterator[tuple[int, int, int]]:
    """(index, first stay, stays) of each chunk a site of `stays` is drawn in."""
    size = max(1, int(cfg.chunk_stays))
    for k, first in enumerate(range(0, stays, size)):
        yield k, first, min(size, stays - first)


def write_site(
    cfg: DictConfig,
    stays: int,
    seed: int,
    out: str | Path,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write a synthetic site as `clif_<table>.parquet` files; returns rows per table."""
    if stays < 1:
        raise FedclifError(f"--stays must be at least 1, got {stays}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, pq.ParquetWriter] = {}
    rows: dict[str, int] = {}
    done = 0
    try:
        for tables in generate(cfg, stays, seed):
            for name, df in tables.items():
                table = _complete(name, df).to_arrow()
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out / f"clif_{name}.parquet", table.schema)
                writers[name].write_table(table.cast(writers[name].schema))
                rows[name] = rows.get(name, 0) + df.height
            done += tables["hospitalization"].height
            if on_chunk:
                on_chunk(done, stays)
    finally:
        for w in writers.values():
            w.close()
    return rows
