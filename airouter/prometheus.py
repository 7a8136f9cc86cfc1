"""What the modelhost's and the gateway's /metrics share: the request-time histograms."""

from prometheus_client import CollectorRegistry, Histogram

# Seconds: from a fast TTFT on a GPU to a long generation on a CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def request_histograms(
    prefix: str, seen_by: str, registry: CollectorRegistry
) -> tuple[Histogram, Histogram]:
    """Time to first token and whole request time, by model."""
    ttft = Histogram(
        f"{prefix}_time_to_first_token_seconds",
        f"Time to first token as the {seen_by} saw it, queue included.",
        ["model"],
        buckets=TTFT_BUCKETS,
        registry=registry,
    )
    latency = Histogram(
        f"{prefix}_request_seconds",
        f"Whole request time as the {seen_by} saw it, queue included.",
        ["model"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    return ttft, latency
