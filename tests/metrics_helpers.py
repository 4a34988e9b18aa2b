"""Prometheus helpers for tests against a live server: scrape its /metrics, read one sample."""

from __future__ import annotations

import re
import urllib.request


def scrape(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str, /, **labels: str) -> float:
    """The value of one sample in a Prometheus text scrape (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.M)
    total = 0.0
    for found_labels, value in pattern.findall(text):
        if all(part in found_labels.split(",") for part in want.split(",") if part):
            total += float(value)
    return total
