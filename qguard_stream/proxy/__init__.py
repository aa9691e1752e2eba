"""The guard proxy: an OpenAI-compatible server that moderates prompts and streamed responses of
any OpenAI-compatible upstream with Qwen3Guard-Stream (`qguard-stream proxy`). Needs the server
extra."""
