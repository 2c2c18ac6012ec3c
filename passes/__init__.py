"""The one registry of passes (installed as dwc.passes). Order here is the canonical order."""

from dwc.passes.calibrate import Calibrate
from dwc.passes.distill_draft import DistillDraft
from dwc.passes.emit import Emit
from dwc.passes.evaluate import Evaluate
from dwc.passes.fuse import Fuse
from dwc.passes.gguf_export import GgufExport
from dwc.passes.kv_layout import KvLayout
from dwc.passes.load import Load
from dwc.passes.modelopt_quantize import ModelOptQuantize
from dwc.passes.quantize import Quantize
from dwc.passes.tune import Tune

REGISTRY = {p.name: p for p in (Load, Calibrate, Quantize, ModelOptQuantize, GgufExport, Fuse,
                                 DistillDraft, KvLayout, Evaluate, Tune, Emit)}
