"""One metrics view of a Ray cluster: each replica copies its own Prometheus samples into Ray
Serve's metrics, which Ray exports from every node's metrics port with `replica`,
`deployment` and `application` labels (Ray prefixes the names with `ray_`). Prometheus
scraping the nodes then sees every replica; the Grafana dashboard reads them with its
`prefix` variable set to `ray_`.

Counters and histogram buckets are copied as gauges of their running totals, so `rate()` and
`histogram_quantile()` work on them as on the originals.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from ray.serve import metrics

# Labels Ray Serve adds itself; a sample's own label of the same name would collide.
RESERVED = {"deployment", "replica", "application", "route"}


class RayMetricsMirror:
    """Copies the samples of a Prometheus exposition into Ray Serve gauges."""

    def __init__(self) -> None:
        self._gauges: dict[tuple[str, tuple[str, ...]], metrics.Gauge] = {}

    def update(self, exposition: str) -> int:
        """Copy every sample of `exposition` (text format); returns how many were copied."""
        copied = 0
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                tags = {k: v for k, v in sample.labels.items() if k not in RESERVED}
                keys = tuple(sorted(tags))
                gauge = self._gauges.get((sample.name, keys))
                if gauge is None:
                    # Ray's stubs say tuple[str]; it takes any tuple of tag names.
                    gauge = metrics.Gauge(sample.name, description=family.documentation,
                                          tag_keys=keys)  # type: ignore[arg-type]  # fmt: skip
                    self._gauges[(sample.name, keys)] = gauge
                gauge.set(float(sample.value), tags=tags)
                copied += 1
        return copied
