"""Prometheus metrics of one shard server, in a registry of its own.

Each server gets its own `CollectorRegistry`, so several servers in one process
(tests, benchmarks) do not clash. Request counts and latencies are recorded as
calls finish; rows, version, step and the usage summary are read from the shard
when the endpoint is scraped.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from store_service.interface import ShardHandle

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ShardCollector:
    """Gauges read from the shard at scrape time."""

    def __init__(self, shard: ShardHandle):
        self._shard = shard

    def collect(self):
        try:
            d = self._shard.describe()
            usage = self._shard.usage()
        except Exception as exc:  # a scrape must not take the server down
            log.warning("metrics scrape could not read the shard: %s", exc)
            return
        labels = [str(d.info.shard_id)]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["shard"])
            g.add_metric(labels, float(value))
            return g

        yield gauge("kstore_rows", "Rows this shard owns", d.info.num_rows)
        yield gauge("kstore_version", "Table version this shard serves", d.info.version)
        yield gauge("kstore_step", "Optimizer step this shard has applied", d.info.step)
        hits = usage.hits
        yield gauge("kstore_usage_hits", "Readout hits summed over the shard's rows", int(hits.sum()))
        yield gauge("kstore_usage_rows_used", "Rows read out at least once", int((hits > 0).sum()))
        yield gauge("kstore_usage_fraction_used", "Fraction of rows read out at least once",
                    float((hits > 0).float().mean()) if hits.numel() else 0.0)
        yield gauge("kstore_usage_weight_sum", "Readout weight summed over the shard's rows",
                    float(usage.weight_sum.sum()))
        yield gauge("kstore_frozen_rows", "Frozen rows", int(usage.frozen.sum()))
        yield gauge("kstore_ablated_rows", "Ablated rows", int(usage.ablated.sum()))


class ServerMetrics:
    def __init__(self, shard: ShardHandle):
        self.registry = CollectorRegistry()
        self.requests = Counter("kstore_requests", "RPCs handled, by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("kstore_request_seconds", "RPC handling time, by method",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.items = Counter("kstore_request_items", "Queries, tokens or rows carried by RPCs, by method",
                             ["method"], registry=self.registry)
        self.nonfinite = Counter("kstore_nonfinite_refused", "Calls and steps refused because they could make a "
                                 "stored value non-finite, by method", ["method"], registry=self.registry)
        self.registry.register(_ShardCollector(shard))
        self._http = None
        self.port: int | None = None

    def observe(self, method: str, code: str, seconds: float, items: int = 0) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)
        if items:
            self.items.labels(method).inc(items)

    def serve_http(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Expose /metrics on `port` (0: a free one); returns the bound port."""
        self._http, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self._http.server_port
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
