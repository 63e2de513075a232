"""Tools: the `@tool` decorator, per-tool policies (timeout, retries, fallback, cost), the executor, circuit breakers, worker threads, process isolation, expectations."""
