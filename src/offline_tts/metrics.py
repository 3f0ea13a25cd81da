"""Prometheus metrics, fed by the per-request records (telemetry.py) and the service's published figures.

Each app gets its own `CollectorRegistry`, so several apps in one process (tests) never clash.
Figures the service already keeps (queue, workers, voice cache, model load time) are read when
/metrics is scraped, through a collector, instead of being copied on every change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .telemetry import RequestRecord, ServiceFigures

# Buckets in seconds: first audio is expected well under a second on a GPU, whole texts take longer.
_TTFA_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_SYNTH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _ServiceCollector(Collector):
    """Reads the figures the service publishes, at scrape time."""

    def __init__(self, figures: Callable[[], ServiceFigures]):
        self.figures = figures

    def collect(self) -> Iterator:
        f = self.figures()
        yield GaugeMetricFamily("tts_model_ready", "1 when the model is loaded and warm", value=1.0 if f.ready else 0.0)
        load = GaugeMetricFamily("tts_model_load_seconds", "Time to load and warm up the model replicas")
        if f.load_seconds is not None:
            load.add_metric([], f.load_seconds)
        yield load
        yield GaugeMetricFamily("tts_workers", "Model replicas", value=f.workers)
        yield GaugeMetricFamily("tts_workers_busy", "Model replicas with work right now", value=f.workers_busy)
        yield GaugeMetricFamily("tts_batch_slots", "Sentences the replicas can decode together", value=f.batch_slots)
        yield GaugeMetricFamily("tts_batch_slots_busy", "Sentences being decoded right now (all replicas)",
                                value=f.batch_slots_busy)
        yield CounterMetricFamily("tts_batch_steps", "Batched GPT decode steps run", value=f.batch_steps)
        yield CounterMetricFamily("tts_batch_rows", "Sentences decoded in those steps (rows / steps: the mean batch size)",
                                  value=f.batch_rows)
        spent = f.thread_seconds
        yield CounterMetricFamily("tts_batch_step_seconds", "Time in batched GPT decode steps", value=spent["step"])
        yield CounterMetricFamily("tts_batch_vocoder_seconds", "Time in HiFi-GAN on the replica threads (between steps)",
                                  value=spent["vocoder"])
        yield CounterMetricFamily("tts_batch_join_stall_seconds",
                                  "Time running streams waited for joining sentences' prefill", value=spent["join_stall"])
        yield GaugeMetricFamily("tts_batch_join_stall_max_seconds", "Longest single join stall so far",
                                value=spent["join_stall_max"])
        yield GaugeMetricFamily("tts_queue_depth", "Sentences waiting for a free slot", value=f.queue_depth)
        yield GaugeMetricFamily("tts_requests_in_progress",
                                "Admitted requests that use the model (syntheses, uploads, default voice changes), running or waiting",
                                value=f.requests_in_progress)
        dropped = CounterMetricFamily("tts_streams_dropped", "Streams dropped because their client stopped reading",
                                      labels=["reason"])
        for reason, count in sorted(f.streams_dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily("tts_queue_limit", "Requests allowed to wait before 503", value=f.queue_limit)
        yield CounterMetricFamily("tts_voice_cache_hits", "Voice conditioning found in the cache (memory or disk)",
                                  value=f.cache_hits)
        yield CounterMetricFamily("tts_voice_cache_disk_hits", "Voice conditioning loaded from the disk cache",
                                  value=f.cache_disk_hits)
        yield CounterMetricFamily("tts_voice_cache_misses", "Voice conditioning computed from the clips", value=f.cache_misses)


class Metrics:
    """The metrics of one app."""

    def __init__(self, figures: Callable[[], ServiceFigures] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tts_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("tts_http_request_duration_seconds", "HTTP request time, body included",
                                         ["route"], buckets=_REQUEST_BUCKETS, registry=r)
        self.first_audio = Histogram("tts_time_to_first_audio_seconds", "From the start of synthesis to the first audio",
                                     ["route"], buckets=_TTFA_BUCKETS, registry=r)
        self.synthesis = Histogram("tts_synthesis_seconds", "Total synthesis time of a request", ["route"],
                                   buckets=_SYNTH_BUCKETS, registry=r)
        self.rtf = Histogram("tts_real_time_factor", "Synthesis time / audio duration (below 1 is faster than real time)",
                             ["route"], buckets=_RTF_BUCKETS, registry=r)
        self.audio_seconds = Counter("tts_audio_seconds", "Seconds of audio generated", registry=r)
        self.characters = Counter("tts_characters", "Characters of text synthesized", registry=r)
        self.wyoming = Counter("tts_wyoming_requests", "Wyoming (Home Assistant) syntheses by kind and outcome",
                               ["kind", "outcome"], registry=r)
        self.websockets_open = Gauge("tts_websocket_connections", "Open WebSocket connections (text in pieces)",
                                     ["route"], registry=r)
        self.websocket_closes = Counter("tts_websocket_closes", "WebSocket connections ended, by close code "
                                        "(1000 normal, 1008 a limit or a bad message, 1009 a message too large, "
                                        "1005/1006 the client left without a close code or vanished)", ["route", "code"], registry=r)
        self.websocket_sentences = Counter("tts_websocket_sentences", "Sentences spoken on WebSocket connections",
                                           ["route"], registry=r)
        if figures is not None:
            r.register(_ServiceCollector(figures))

    def observe_request(self, method: str, route: str, status: int, seconds: float, record: RequestRecord | None) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)
        self.observe_synthesis(route, record)

    def observe_synthesis(self, route: str, record: RequestRecord | None) -> None:
        """Time to first audio, synthesis time, real-time factor, audio seconds and characters of one request."""
        stats = record.stats if record else None
        if stats is None or not stats.audio_samples:
            return
        if stats.first_audio_s is not None:
            self.first_audio.labels(route).observe(stats.first_audio_s)
        total = (stats.finished or time.perf_counter()) - stats.started
        self.synthesis.labels(route).observe(total)
        audio_s = record.audio_seconds or 0.0
        self.audio_seconds.inc(audio_s)
        if audio_s > 0:
            self.rtf.labels(route).observe(total / audio_s)
        if record.characters:
            self.characters.inc(record.characters)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (and its content type) in the format the scraper asked for: Prometheus text or OpenMetrics."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
