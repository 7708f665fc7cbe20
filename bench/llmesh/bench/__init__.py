"""llmesh benchmarks: llmesh side by side with `vllm serve` and with the worker alone.

`llmesh bench` (and `make bench`) runs them; see bench/README.md. Modules:
- `settings`: what one run measures (frozen settings built from the command line);
- `stats`: per-request samples and their summaries (percentiles, rates);
- `clients`: the load generator's clients, real network clients (gRPC stubs, httpx);
- `loadgen`: closed-loop load at a fixed concurrency, bounded in count and time;
- `procs`: child processes the bench starts, and CPU/RSS meters over them (psutil);
- `targets`: the servers under test (vLLM's OpenAI server, the llmesh stack, Envoy);
- `engine_run`: the baseline, worker, gRPC and REST targets on the real engine;
- `overhead`: the platform's own overhead with the engine replaced by the scripted double;
- `scripted_worker`: a worker process around that double (benchmarks only);
- `report`: JSON, Markdown and PNG output.
"""
