"""Model I/O: checked Hugging Face checkpoints, loading (and LoRA merging), KV cache
scales; shared by the compiler and the runtime."""
