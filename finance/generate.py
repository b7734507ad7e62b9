"""A generated through-the-door credit population: applications, six months of card and account
activity, a social graph and device fingerprints, all driven by one latent risk per applicant.

Everything here is GENERATED, not real: the tables carry `moeworks.generated=true` in their Parquet
metadata and the folder a GENERATED.md note. Defaults depend on all four sources: each is a noisy
view of the latent risk, and fraud rings (shared devices and phones) and segment-specific effects
add signal only one source carries. Vectorised numpy throughout (a million applicants in seconds).

Tables (one Parquet part per `part_rows` applicants, the same applicants in the same part of every
table, so a batch job can take part i of each table together):
    applications/  one row per applicant (incl. the label `default_12m`)
    transactions/  one row per applicant and month; month 1 is the most recent of six
    social_edges/  one row per link: contact, shared_phone or shared_address
    devices/       one row per applicant: the fingerprint captured with the application
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MONTHS = 6
SEGMENTS = ("salaried", "self_employed", "student", "retired")
HOUSING = ("own", "mortgage", "rent", "family")
EDUCATION = ("graduate", "university", "high_school", "other")
CHANNELS = ("branch", "online", "broker")
REGIONS = tuple(f"region_{i}" for i in range(8))
OS_FAMILIES = ("android", "ios", "web")
RELATIONS = ("contact", "shared_phone", "shared_address")
MONTHLY_FIELDS = ("credit_limit", "statement_balance", "card_spend", "card_txn_count", "cash_advance",
                  "online_spend_share", "gambling_spend", "payment_amount", "min_payment_missed",
                  "days_past_due", "salary_inflow", "overdraft_days", "atm_withdrawals", "returned_debits")
TABLES = ("applications", "transactions", "social_edges", "devices")
TARGET = "default_12m"


@dataclass
class GeneratorConfig:
    n_applicants: int = 100_000
    seed: int = 0
    default_rate: float = 0.08  # a typical unsecured-lending bad rate; the intercept is solved to hit it
    part_rows: int = 250_000  # applicants per Parquet part: ~50 MB of transactions, one batch-job chunk
    ring_share: float = 0.03  # applicants in fraud rings (shared devices and phones)

    def __post_init__(self) -> None:
        assert self.n_applicants >= 1, "n_applicants must be >= 1"
        assert 0 < self.default_rate < 0.5, "default_rate must be in (0, 0.5)"
        assert self.part_rows >= 1, "part_rows must be >= 1"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _choice(rng: np.random.Generator, levels: tuple[str, ...], probs: np.ndarray) -> np.ndarray:
    """Per-row categorical draw; probs: (n, levels) rows summing to 1."""
    cum = np.cumsum(probs, axis=1)
    idx = (rng.random(len(probs))[:, None] > cum).sum(axis=1).clip(0, len(levels) - 1)
    return np.asarray(levels, dtype=object)[idx]


def generate_population(config: GeneratorConfig) -> dict[str, dict[str, np.ndarray]]:
    """All four tables as column dicts of numpy arrays (applicants sorted by id)."""
    rng = np.random.default_rng(config.seed)
    n = config.n_applicants
    z = rng.standard_normal(n)  # the latent risk
    ids = np.arange(1, n + 1, dtype=np.int64)
    seg = rng.choice(len(SEGMENTS), n, p=[0.55, 0.2, 0.15, 0.1])
    ring = rng.random(n) < config.ring_share * 2 * _sigmoid(1.5 * z - 1.0)

    # Applications.
    age = np.select([seg == 2, seg == 3], [rng.uniform(18, 28, n), rng.uniform(60, 82, n)],
                    rng.uniform(22, 62, n)) - 2.5 * z
    age = np.clip(np.round(age), 18, 90)
    base_income = np.array([3500, 4200, 900, 2200])[seg]
    income = np.round(base_income * np.exp(0.45 * rng.standard_normal(n) - 0.22 * z), 0)
    income_volatility = np.where(seg == 1, rng.gamma(2.0, 0.15, n), rng.gamma(1.0, 0.05, n))
    employment_years = np.clip(np.round(np.minimum(age - 18, rng.gamma(2, 3, n) * np.exp(-0.25 * z)), 1), 0, 60)
    housing = _choice(rng, HOUSING, np.stack([np.full(n, 0.3), np.full(n, 0.3), 0.25 + 0.1 * _sigmoid(z),
                                              np.full(n, 0.15)], 1) / (1.0 + 0.1 * _sigmoid(z))[:, None])
    education = _choice(rng, EDUCATION, np.tile([0.2, 0.4, 0.3, 0.1], (n, 1)))
    channel = _choice(rng, CHANNELS, np.stack([np.full(n, 0.4), np.full(n, 0.45), 0.1 + 0.1 * _sigmoid(z)], 1)
                      / (0.95 + 0.1 * _sigmoid(z))[:, None])
    region_risk = rng.normal(0, 0.3, len(REGIONS))
    region_idx = rng.integers(0, len(REGIONS), n)
    inquiries = rng.poisson(np.exp(0.2 + 0.45 * z + np.where(seg == 2, 0.4, 0.0)))
    applications = {
        "applicant_id": ids,
        "employment_type": np.asarray(SEGMENTS, dtype=object)[seg],
        "age": age,
        "monthly_income": income,
        "employment_years": employment_years,
        "housing": housing,
        "education": education,
        "region": np.asarray(REGIONS, dtype=object)[region_idx],
        "channel": channel,
        "requested_amount": np.round(income * rng.uniform(1, 10, n) * np.exp(0.2 * z), -1),
        "term_months": rng.choice([12, 24, 36, 48, 60], n).astype(np.float64),
        "existing_debt": np.round(income * rng.gamma(1.5, 2.0, n) * np.exp(0.3 * z), 0),
        "num_credit_lines": rng.poisson(np.exp(1.0 + 0.15 * z)).astype(np.float64),
        "bureau_score": np.clip(np.round(660 - 55 * z + rng.normal(0, 45, n)), 300, 850),
        "inquiries_6m": inquiries.astype(np.float64),
        "num_dependents": rng.poisson(0.9, n).astype(np.float64),
        "years_at_address": np.round(rng.exponential(6, n) * np.exp(-0.2 * z), 1),
    }

    # Six months of card and account activity; month 1 is the latest. Risk drifts over the window
    # for some applicants (deterioration is a signal of its own).
    drift = rng.normal(0.25 * z, 0.5)
    recency = np.linspace(1.0, 0.0, MONTHS)  # month 1 carries the full drift
    r = z[:, None] + drift[:, None] * recency[None, :] + 0.35 * rng.standard_normal((n, MONTHS))  # (n, 6)
    limit = np.round(income * rng.uniform(1, 4, n) * np.exp(-0.1 * z), -2)[:, None] * np.ones((1, MONTHS))
    balance = np.round(limit * _sigmoid(-0.6 + 0.9 * r + 0.3 * rng.standard_normal((n, MONTHS))), 2)
    spend = np.round(income[:, None] * 0.3 * np.exp(0.15 * r + 0.4 * rng.standard_normal((n, MONTHS))), 2)
    cash = np.where(rng.random((n, MONTHS)) < _sigmoid(r - 2.0), rng.lognormal(5.5, 0.8, (n, MONTHS)), 0.0)
    gambling = np.where(rng.random((n, MONTHS)) < _sigmoid(r - 3.0), rng.lognormal(4.5, 1.0, (n, MONTHS)), 0.0)
    pay_ratio = _sigmoid(1.4 - 1.2 * r + 0.5 * rng.standard_normal((n, MONTHS)))
    missed = (rng.random((n, MONTHS)) < _sigmoid(1.3 * r - 3.2)).astype(np.float64)
    dpd = 30.0 * np.clip(np.floor(np.maximum(0, r + rng.standard_normal((n, MONTHS)) - 1.6) * 1.5), 0, 3)
    salary = income[:, None] * (1 + income_volatility[:, None] * rng.standard_normal((n, MONTHS)))
    salary = np.round(np.where(rng.random((n, MONTHS)) < _sigmoid(r - 2.6), 0.0, salary.clip(0)), 2)
    monthly = {
        "credit_limit": limit,
        "statement_balance": balance,
        "card_spend": spend,
        "card_txn_count": rng.poisson(20 * np.exp(0.1 * r)).astype(np.float64),
        "cash_advance": np.round(cash, 2),
        "online_spend_share": np.round(rng.beta(2 + np.exp(0.2 * r), 3.0), 3),
        "gambling_spend": np.round(gambling, 2),
        "payment_amount": np.round(balance * pay_ratio, 2),
        "min_payment_missed": missed,
        "days_past_due": dpd,
        "salary_inflow": salary,
        "overdraft_days": rng.poisson(np.exp(r - 1.2)).astype(np.float64),
        "atm_withdrawals": rng.poisson(np.exp(1.0 + 0.2 * r)).astype(np.float64),
        "returned_debits": rng.poisson(np.exp(r - 2.5)).astype(np.float64),
    }
    transactions = {"applicant_id": np.repeat(ids, MONTHS),
                    "month": np.tile(np.arange(1, MONTHS + 1, dtype=np.int64), n),
                    **{k: v.reshape(-1) for k, v in monthly.items()}}

    # Social graph: contacts (homophily in risk), shared phones and addresses (rings share more).
    n_links = rng.poisson(4 + 2 * ring + np.maximum(z, 0))
    src = np.repeat(np.arange(n), n_links)
    p_phone = np.where(ring[src], 0.35, 0.03 * _sigmoid(z[src]))
    p_addr = np.where(ring[src], 0.25, 0.05)
    u = rng.random(len(src))
    relation = np.where(u < p_phone, 1, np.where(u < p_phone + p_addr, 2, 0))
    contact_z = 0.6 * z[src] + 0.8 * rng.standard_normal(len(src)) + 1.5 * ring[src] * (relation > 0)
    social = {"applicant_id": ids[src],
              "contact_id": rng.integers(1, 10 * n + 1, len(src)).astype(np.int64),
              "relation": np.asarray(RELATIONS, dtype=object)[relation],
              "contact_delinquent": rng.random(len(src)) < _sigmoid(1.1 * contact_z - 2.6)}

    # Device fingerprints: ring members share a small pool of devices.
    device_id = np.where(ring, rng.integers(0, max(1, ring.sum() // 6 + 1), n), n + np.arange(n)).astype(np.int64)
    _, inverse, counts = np.unique(device_id, return_inverse=True, return_counts=True)
    emulator = rng.random(n) < _sigmoid(2.0 * z - 6.0 + 3.0 * ring)
    geo_mismatch = rng.random(n) < _sigmoid(z - 2.5 + 1.5 * ring)
    devices = {
        "applicant_id": ids,
        "device_id": np.char.add("dev-", device_id.astype(str)).astype(object),
        "os": _choice(rng, OS_FAMILIES, np.tile([0.55, 0.35, 0.10], (n, 1))),
        "is_emulator": emulator,
        "is_rooted": rng.random(n) < _sigmoid(1.2 * z - 4.0 + 1.5 * ring),
        "accounts_on_device": counts[inverse].astype(np.float64) + rng.poisson(0.1, n),
        "ip_geo_mismatch": geo_mismatch,
        "geo_distance_km": np.round(rng.exponential(15, n) * (1 + 20 * geo_mismatch), 1),
        "ip_is_proxy": rng.random(n) < _sigmoid(z - 3.5 + 2.0 * ring),
        "device_age_days": np.round(rng.gamma(2, 200, n) * np.exp(-0.3 * z - 1.5 * ring)),
        "application_hour": np.floor(np.mod(rng.normal(14, 4, n) + (rng.random(n) < _sigmoid(z - 2)) * 10, 24)),
        "form_fill_seconds": np.round(rng.lognormal(5.2, 0.4, n) * np.where(emulator, 0.2, 1.0), 1),
    }

    # The outcome: the latent risk plus what only one source knows (rings, deterioration, segments).
    log_odds = (1.3 * z + 1.6 * ring + 0.5 * drift + region_risk[region_idx]
                + np.where(seg == 1, 1.2 * income_volatility, 0.0)
                + np.where(seg == 2, 0.25 * np.minimum(inquiries, 6), 0.0)
                + np.where(seg == 3, -0.3, 0.0) + 0.8 * emulator)
    intercept = _solve_intercept(log_odds, config.default_rate)
    applications[TARGET] = (rng.random(n) < _sigmoid(log_odds + intercept)).astype(np.int64)
    return {"applications": applications, "transactions": transactions, "social_edges": social, "devices": devices}


def _solve_intercept(log_odds: np.ndarray, rate: float) -> float:
    low, high = -20.0, 20.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if _sigmoid(log_odds + mid).mean() < rate else (low, mid)
    return (low + high) / 2


def write_population(tables: dict[str, dict[str, np.ndarray]], out_dir: str | Path, *,
                     part_rows: int = 250_000) -> Path:
    """Write each table as Parquet parts aligned by applicant blocks, plus a GENERATED.md note."""
    out = Path(out_dir)
    ids = tables["applications"]["applicant_id"]
    bounds = list(range(0, len(ids), part_rows)) + [len(ids)]
    for name, columns in tables.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        key = columns["applicant_id"]
        for part, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            start, stop = np.searchsorted(key, [ids[lo], ids[hi - 1] + 1])  # tables are sorted by applicant
            table = pa.table({c: v[start:stop] for c, v in columns.items()})
            table = table.replace_schema_metadata({"moeworks.generated": "true", "moeworks.table": name})
            pq.write_table(table, out / name / f"part-{part:05d}.parquet", compression="snappy")
    (out / "GENERATED.md").write_text(
        "# Generated data, not real\n\nWritten by `finance.generate` (a seeded, latent-risk population): "
        f"{len(ids):,} applicants; tables {', '.join(tables)}.\n")
    return out


def generate(out_dir: str | Path, config: GeneratorConfig | None = None) -> Path:
    """Generate a population and write it under `out_dir`; returns the folder."""
    config = config or GeneratorConfig()
    return write_population(generate_population(config), out_dir, part_rows=config.part_rows)
