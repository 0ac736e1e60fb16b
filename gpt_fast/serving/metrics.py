"""The metrics the serving loop emits, by the names they have on the Prometheus endpoint (scripts/metrics.yaml
lists the same), and the emit callback through which the frontend records them."""
from typing import Callable

TIME_TO_FIRST_TOKEN = "gpt_fast_time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "gpt_fast_inter_token_latency_seconds"
GENERATED_TOKENS = "gpt_fast_generated_tokens_total"
REQUESTS_FINISHED = "gpt_fast_requests_finished_total"  # reason: stop | length | cancelled | error
ACTIVE_SLOTS = "gpt_fast_active_slots"
ACCEPTANCE_RATE = "gpt_fast_speculative_acceptance_rate"  # per finished request: accepted / drafted tokens
PREFIX_CACHE_BLOCKS = "gpt_fast_prefix_cache_blocks_total"  # event: hit | miss | evicted
PREFIX_CACHE_SAVED_TOKENS = "gpt_fast_prefix_cache_saved_tokens_total"

# emit(metric name, value, **labels)
Emit = Callable[..., None]
