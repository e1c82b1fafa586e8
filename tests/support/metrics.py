"""Scraping `--metrics-listen` over real HTTP, and the daemon arguments the metrics tests
share."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from support.daemons import THREADS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# One llama.cpp thread (support.daemons.THREADS): the machine's cores are shared.
ARGS = (*THREADS, "--ctx-per-stream", "256", "--max-streams", "2")


def fetch(port: int) -> str:
    """GET /metrics straight to loopback (no proxy from the environment)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
        return text


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> Samples:
    return parse(fetch(port))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
