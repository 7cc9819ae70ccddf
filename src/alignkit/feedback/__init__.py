"""Human-feedback data toolkit: importers, exporters, label aggregation, agreement, inspection.

    alignkit data inspect|validate|convert|aggregate|split ...   (see alignkit.feedback.cli)

    from alignkit.feedback import import_data, aggregate_examples, export_examples
    examples = import_data("export.json")                          # format detected
    clean = aggregate_examples(examples, method="dawid_skene", drop_below=0.6)
    export_examples(clean, "trl-preference", "pairs.jsonl")

Core paths need numpy only; pandas/Crowd-Kit are optional (``alignkit[crowd]``).
"""

from alignkit.feedback.aggregate import aggregate_examples, annotator_accuracy, bradley_terry_scores, dawid_skene
from alignkit.feedback.agreement import agreement_report, krippendorff_alpha
from alignkit.feedback.exporters import export_examples, export_rows
from alignkit.feedback.importers import FORMATS, detect_format, import_data, read_rows
from alignkit.feedback.inspect import inspect_examples, split_by_prompt

__all__ = ["aggregate_examples", "annotator_accuracy", "bradley_terry_scores", "dawid_skene", "agreement_report",
           "krippendorff_alpha", "export_examples", "export_rows", "FORMATS", "detect_format", "import_data",
           "read_rows", "inspect_examples", "split_by_prompt"]
