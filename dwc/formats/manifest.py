"""The bundle's manifest.json: its file name, schema string, folders and keys (README.md,
"The bundle")."""

MANIFEST = "manifest.json"
SCHEMA = "dwc.bundle/1"

MODEL_DIR = "model"
DRAFT_DIR = "draft"
# An EAGLE head in draft/: its own weights and its config (dwc/model/eagle_head.py).
EAGLE_WEIGHTS = "eagle.safetensors"
EAGLE_CONFIG = "eagle.json"
SERVE_DIR = "serve"
REPORTS_DIR = "reports"
README = "README.md"

# Top-level keys, in the order they are written.
KEYS = (
    "schema", "dwc_version", "name", "target", "source", "passes", "quantization",
    "draft", "fusion", "kv_cache", "quality", "slo", "search", "build", "files",
)
# Keys added after bundles were first written: a manifest without one reads as null.
LATER_KEYS = ("search",)
TARGET_KEYS = ("name", "backend", "hardware")
PASS_KEYS = ("name", "options", "seconds", "cached", "metrics")
QUALITY_KEYS = ("metric", "baseline", "optimized", "delta_pct", "budget_pct", "passed")
FILE_KEYS = ("sha256", "bytes")

# The only fields that differ between two builds of the same inputs: wall-clock pass
# timings and cache hits (manifest["passes"][i]["seconds" | "cached"]) and manifest["build"]
# (when and where it was built). They live in manifest.json only, which is not itself
# listed in "files"; every listed file is byte-identical across builds.
VOLATILE_PASS_KEYS = ("seconds", "cached")


def speculation(draft: dict | None) -> str | None:
    """How a bundle speculates, from its manifest's `draft`: "draft_model" (the model in
    draft/), "eagle" (an EAGLE head in draft/), "ngram" (lookup in the text, no model),
    or None. `draft` is null when the
    build left the measurement out, and names method "none" when not speculating won;
    bundles from before the measured choice had a draft model or nothing."""
    if not draft:
        return None
    method = draft.get("method", "draft_model")
    return None if method == "none" else method


# The backend whose bundles dwc's own runtime serves (`dwc serve`, `dwc bench`, Engine):
# the runtime reads this layout and no other.
RUNTIME_BACKEND = "torch-triton"
