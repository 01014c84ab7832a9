"""Prometheus metrics of `gpt-serve` (GET /metrics), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the *_created series only double the output

# Latency buckets in seconds: tokens take milliseconds to tenths of a second on a CPU, a first
# token behind a long prompt or a queue can take seconds.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
# A constraint's compile takes microseconds from the cache to a second for a large grammar; a mask
# microseconds to milliseconds.
_COMPILE_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_MASK_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("gpt2np_requests_running", "Sequences in the decode batch.", registry=r)
        self.waiting = Gauge("gpt2np_requests_waiting", "Sequences queued for a place in the batch.", registry=r)
        self.requests = Counter("gpt2np_requests", "HTTP requests to the API, by path and status code.",
                                ["path", "status"], registry=r)
        self.finished = Counter("gpt2np_sequences_finished", "Sequences (choices) ended, by the engine's reason.",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("gpt2np_prompt_tokens", "Prompt tokens submitted.", registry=r)
        self.generation_tokens = Counter("gpt2np_generation_tokens", "Tokens generated.", registry=r)
        # as vLLM names them: prompt tokens looked up in the prefix cache, and found there
        self.prefix_cache_queries = Counter("gpt2np_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                            "cache.", registry=r)
        self.prefix_cache_hits = Counter("gpt2np_prefix_cache_hits", "Prompt tokens found in the prefix cache "
                                         "(not computed).", registry=r)
        self.prefix_cache_bytes = Gauge("gpt2np_prefix_cache_bytes", "Bytes the prefix cache holds.", registry=r)
        self.time_to_first_token = Histogram(
            "gpt2np_time_to_first_token_seconds", "From a request's arrival to its first token.",
            buckets=_TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "gpt2np_time_per_output_token_seconds", "Between consecutive tokens of a sequence.",
            buckets=_TPOT_BUCKETS, registry=r)
        self.packed_weight_bytes = Gauge("gpt2np_packed_weight_bytes", "Bytes of the weights' copy in the matmul "
                                         "backend's layout (0 with NumPy, which reads the mapped file).", registry=r)
        self.constrained_requests = Counter("gpt2np_constrained_requests", "Requests with a constraint on the "
                                            "output (response_format, structured_outputs, json_schema, grammar).",
                                            registry=r)
        self.constraint_compile = Histogram(
            "gpt2np_constraint_compile_seconds", "Per constrained sequence: compiling its constraint (off the "
            "engine's loop; a cached one costs only its matcher).", buckets=_COMPILE_BUCKETS, registry=r)
        self.constraint_mask = Histogram(
            "gpt2np_constraint_mask_seconds", "Per constrained sequence: the mean time of one token mask.",
            buckets=_MASK_BUCKETS, registry=r)
        self.forced_tokens = Counter("gpt2np_constraint_forced_tokens", "Tokens a constraint forced, appended "
                                     "without sampling (fast-forward).", registry=r)
