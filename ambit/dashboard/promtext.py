"""Prometheus text exposition to flat samples, with bounds, for the dashboard's model.

Why it exists: the model reads a few metric families out of each node's and waypoint's
``/metrics`` (a few hundred KiB on a busy waypoint). prometheus_client's parser does the format;
this module keeps only the families asked for, never more than ``max_samples`` of them, and turns
a malformed exposition into "no samples" plus the reason instead of an exception in the gather
loop (one bad node must not blank the whole view).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

MAX_SAMPLES = 50_000


@dataclass(frozen=True)
class Sample:
    """One sample: its full name (``..._total`` included), labels and value."""

    name: str
    labels: dict[str, str]
    value: float


def parse(text: str, families: Iterable[str], max_samples: int = MAX_SAMPLES) \
        -> tuple[list[Sample], str | None]:
    """The samples of ``families`` (names without ``_total``) in ``text``, and an error (or
    None). ``_created`` samples are dropped; past ``max_samples`` the rest is dropped and the
    error says so."""
    wanted = set(families)
    out: list[Sample] = []
    try:
        for fam in text_string_to_metric_families(text):
            if fam.name not in wanted:
                continue
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                if len(out) >= max_samples:
                    return out, f"more than {max_samples} samples; the rest were ignored"
                out.append(Sample(s.name, dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError) as e:
        return out, f"bad metrics text: {e}"
    return out, None
