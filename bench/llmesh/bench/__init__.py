"""llmesh benchmarks: llmesh side by side with `vllm serve`, measured with vLLM's own client.

`llmesh bench` (and `make bench`) runs them; see bench/README.md. Modules:
- `settings`: what one run measures (frozen settings built from the command line);
- `vllm_client`: vLLM's serving benchmark client (`vllm.benchmarks.serve`) as a child process, and
  its prompts for the gRPC client;
- `grpc_client`: llmesh's native gRPC load client (ModelService.StreamChatCompletion);
- `stats`: per-request samples and level summaries, with vLLM's metric definitions;
- `procs`: child processes the bench starts, and CPU/RSS meters over any process (psutil);
- `targets`: the servers under test (vLLM's OpenAI server, a whole llmesh stack with Envoy);
- `run`: the baseline, REST and gRPC targets on the real engine;
- `overhead`: the endpoint picker's added time to first token, engine replaced by the scripted double;
- `soak`: rounds at 64 streams through Envoy, statuses and RSS of every process per round;
- `scripted_worker`: a worker process around that double (benchmarks only);
- `report`, `plots`: JSON, Markdown, PNG and the README snippet.
"""
