"""One device at a time: fits, claims and reports of a sweep never mix devices.

A sweep on a cluster may hold rows measured on different devices (an H100 and an A100, two
CPU models). Every row names its device (``device_name``); :func:`by_device` splits the
rows by it, each part with the sweep's record of that device (``sweep.json``'s
``devices``: its environment and the rates measured where its points ran, see
:func:`~riemann_core.scaling.sweep.add_device`), and fit, validate and report run on each
part alone: the speed of light, the time model's yardsticks and the rule on rates that
moved during the sweep all use that device's rates. Rows written before ``device_name``
was recorded belong to the sweep's one device.

Needs pandas (the ``bench`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import pandas as pd

from ..measure.timing import RATE_KINDS
from . import fit, validate
from .sweep import device_of_unnamed_rows


def named(df: pd.DataFrame, meta: Mapping) -> pd.DataFrame:
    """``df`` with a ``device_name`` in every row (where blank, the sweep's device if it
    has one, ``unknown device`` if it has several:
    :func:`~.sweep.device_of_unnamed_rows`) and the best rate of each kind its device
    reached in its dtype during the sweep (``best_rate_<kind>``, FLOP/s; NaN where not
    measured), which bound the time models' rates (:func:`~.fit.fit_time_model`)."""
    names = df["device_name"] if "device_name" in df else pd.Series("", index=df.index)
    unnamed = device_of_unnamed_rows(meta)
    df = df.assign(device_name=names.fillna("").astype(str).replace("", unnamed))
    best = {
        (name, dtype): fit.best_rates(device_meta(meta, name), dtype)
        for name, dtype in set(zip(df["device_name"], df["dtype"]))
    }
    return df.assign(
        **{
            f"best_rate_{kind}": [
                best[key].get(kind, math.nan) for key in zip(df["device_name"], df["dtype"])
            ]
            for kind in RATE_KINDS
        }
    )


def device_meta(meta: Mapping, name: str) -> dict:
    """``meta`` with the rates (``device_rates``) and environment of the device ``name`` at
    the top, where fit and validate read them (a sweep written before ``devices`` has them
    there already)."""
    entry = (meta.get("devices") or {}).get(name)
    if entry is None:
        return dict(meta)
    return {
        **meta,
        "device_rates": entry.get("device_rates", []),
        "environment": entry.get("environment", {}),
    }


def by_device(df: pd.DataFrame, meta: Mapping) -> Iterator[tuple[str, pd.DataFrame, dict]]:
    """``(device name, its rows, its meta)`` for every device with ok rows (or, where none
    has any, every device), ``df`` as :func:`named` completes it."""
    df = named(df, meta)
    groups = list(df.groupby("device_name", sort=True))
    measured = [(name, rows) for name, rows in groups if (rows["status"] == "ok").any()]
    for name, rows in measured or groups:
        yield str(name), rows, device_meta(meta, str(name))


def achieved_rates(df: pd.DataFrame, meta: Mapping) -> pd.DataFrame:
    """:func:`~riemann_core.scaling.fit.achieved_rates` of each device and dtype against
    its own rates (a float64 point against the float64 rates)."""
    parts = [
        fit.achieved_rates(rows, fit.sweep_rates(rows, m))
        for _, device_rows, m in by_device(df, meta)
        for _, rows in device_rows.groupby("dtype", sort=True)
    ]
    return pd.concat(parts, ignore_index=True)


def claims(
    df: pd.DataFrame,
    meta: Mapping,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[str, validate.Claim]]:
    """``(device name, claim)``: :func:`~riemann_core.scaling.validate.validate` per
    device (``progress`` as there)."""
    return [
        (name, claim)
        for name, rows, m in by_device(df, meta)
        for claim in validate.validate(rows, m, seed=seed, progress=progress)
    ]


def summary(df: pd.DataFrame, meta: Mapping) -> pd.DataFrame:
    """Which devices contributed: per device name, its hosts, workers (a host's device),
    ok and all points, and the median of its GEMM rates during the sweep."""
    df = named(df, meta)
    records = []
    for name, rows in df.groupby("device_name", sort=True):
        hosts, devices = _text(rows, "host"), _text(rows, "physical_device")
        rate = fit.best_rates(device_meta(meta, str(name)), fit.ok_dtype(rows)).get("products")
        records.append(
            {
                "device": name,
                "hosts": ", ".join(sorted(set(hosts) - {""})) or "not recorded",
                "workers": len({w for w in zip(hosts, devices) if w != ("", "")}),
                "points ok": int((rows["status"] == "ok").sum()),
                "points": len(rows),
                "GEMM GFLOP/s": None if rate is None else rate / 1e9,
            }
        )
    return pd.DataFrame.from_records(records)


def _text(rows: pd.DataFrame, column: str) -> list[str]:
    """``column`` as text, blank where missing (results written before it was recorded)."""
    if column not in rows:
        return [""] * len(rows)
    return rows[column].fillna("").astype(str).tolist()
