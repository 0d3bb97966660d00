"""Data contracts (Great Expectations 1.x suites) for the ingest datasets.

    from alignflow.data_contracts import validate
    result = validate(pairs_df, "pairs", docs_dir=Path("reports/gx"), batch_name="run-42")
    result.raise_for_table_failures()       # ContractViolation on table-level failures
    keep, quarantine = result.valid, result.rejected

Importing this package does not import great_expectations (that happens on
the first ``validate`` call).
"""

from .contracts import (
    COLUMNS,
    DEFAULT_MAX_CHARS,
    KINDS,
    ContractResult,
    ContractViolation,
    ExpectationSpec,
    TableFailure,
    expectations_for,
    validate,
)

__all__ = [
    "COLUMNS",
    "DEFAULT_MAX_CHARS",
    "KINDS",
    "ContractResult",
    "ContractViolation",
    "ExpectationSpec",
    "TableFailure",
    "expectations_for",
    "validate",
]
