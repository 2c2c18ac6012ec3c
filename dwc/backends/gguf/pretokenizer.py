"""Which llama.cpp pre-tokenizer name reproduces the Hugging Face tokenizer: each name is
tried on a vocabulary-only GGUF file in llama.cpp (in its child process) until one
tokenizes a probe text exactly as the checkpoint's tokenizer does."""

from __future__ import annotations

from pathlib import Path

from dwc.backends.gguf.file import ARCHITECTURES, write_hyperparameters, write_tokenizer

# Appended to the probe text: what tells pre-tokenizers apart (runs of digits, spaces,
# tabs and newlines, contractions, punctuation runs, non-Latin scripts, emoji), so that
# a text without them cannot pick a near-miss. Written for dwc.
PROBE_EXTRA = ("\n \n\n \t\t \t\n   \n    x  \n 1 12 123 1234 12345 123456 1234567 3.14 "
               "1..2 1...2 don't I'm we'Re YOU'LL they've she'd 'quoted' \"\"\"!!!??? ---=== "
               "Здравствуй мир 你好，世界2024年 こんにちは 안녕하세요 مرحبا 🙂🚀 ✅ 🦙🦙 ")
# Pre-tokenizer names llama.cpp accepts (llama-vocab.cpp), most common byte-level BPE first.
PRE_TOKENIZERS = ("gpt-2", "llama-bpe", "qwen2", "default", "starcoder", "falcon",
                  "deepseek-llm", "deepseek-coder", "mpt", "refact", "command-r", "olmo",
                  "dbrx", "smaug-bpe", "jais", "tekken", "smollm", "codeshell", "bloom")


def choose_pre_tokenizer(config: dict, source_dir: Path, text: str, work: Path) -> str | None:
    """The first pre-tokenizer name under which llama.cpp tokenizes `text` exactly as the
    Hugging Face tokenizer does (tried on vocabulary-only GGUF files); None if none does."""
    import gguf
    from transformers import AutoTokenizer

    from dwc.backends.gguf.child import LlamaProcess

    text = text + PROBE_EXTRA
    want = AutoTokenizer.from_pretrained(source_dir, local_files_only=True)(
        text, add_special_tokens=False).input_ids
    arch = ARCHITECTURES[config["architectures"][0]]
    probe = Path(work) / "vocab-probe.gguf"
    # llama.cpp in one child process for all the names (backends/gguf/child.py)
    with LlamaProcess("probing the pre-tokenizer of", probe) as child:
        try:
            for pre in PRE_TOKENIZERS:
                w = gguf.GGUFWriter(str(probe), arch)
                write_hyperparameters(w, config, "probe")
                write_tokenizer(w, Path(source_dir), config, pre)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
                w.close()
                try:
                    got = child.call(llama_tokenize, probe, text)
                except (ValueError, RuntimeError):  # a name this llama.cpp build does not know
                    continue
                if got == want:
                    return pre
        finally:
            probe.unlink(missing_ok=True)
    return None


def llama_tokenize(path: Path, text: str) -> list[int]:
    """llama.cpp's tokenization of `text` (no BOS), from the file's vocabulary alone."""
    from llama_cpp import Llama

    from dwc.backends.gguf.child import quiet

    quiet()
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return vocab.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        vocab.close()
