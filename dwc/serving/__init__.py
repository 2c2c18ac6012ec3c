"""Serving: `InferenceServer`, the OpenAI-compatible HTTP API and its request and
logprobs shapes, over the runtime."""
