"""Custom GX 1.x expectations used by the alignflow data contracts.

``ExpectQuestionIdsInOneSplit`` (table-level): a question never sits in two splits.
GX has no built-in for "the same ``(site, question_id)`` never carries two
different ``split`` values". ``UnexpectedRowsExpectation`` would express it as
SQL, but GX 1.24.1 has no pandas provider for its metric (``No provider found
for unexpected_rows_query.table using PandasExecutionEngine``), so this module
registers a small table metric with a pandas implementation plus a
``BatchExpectation`` that uses it.

``ExpectColumnPairValuesToNotBeEqual`` (row-level): ``chosen != rejected``.
GX has ``ExpectColumnPairValuesToBeEqual`` but no negation;
``ExpectSelectColumnValuesToBeUniqueWithinRecord`` says the same thing but
runs ``DataFrame.nunique(axis=1)`` row by row (~1.5 s on 100k rows), so this is
a vectorised column-pair map expectation mirroring the built-in one.

This module imports great_expectations at top level (~2-3 s): import it lazily,
only from inside the validation code. Importing registers the metric and the
expectation with GX's global registries, once per process.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple

import pandas as pd
from great_expectations.compatibility import pydantic
from great_expectations.core.metric_domain_types import MetricDomainTypes
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import (
    BatchExpectation,
    ColumnPairMapExpectation,
)
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnPairMapMetricProvider,
    column_pair_condition_partial,
)
from great_expectations.expectations.metrics.metric_provider import metric_value
from great_expectations.expectations.metrics.table_metric_provider import (
    TableMetricProvider,
)
from great_expectations.render import LegacyRendererType, RenderedStringTemplateContent
from great_expectations.render.renderer.renderer import renderer

METRIC_NAME = "table.alignflow_question_split_conflicts"
MAX_EXAMPLES = 20


def split_conflicts(
    df: pd.DataFrame, question_columns: List[str], split_column: str
) -> Dict[str, Any]:
    """Groups of ``question_columns`` that carry more than one distinct split.

    Rows with a null key or split are ignored (the not-null expectations
    report those). Returns the number of conflicting groups, the number of
    rows in them, and up to ``MAX_EXAMPLES`` groups as dicts.
    """
    cols = list(question_columns) + [split_column]
    sub = df[cols].dropna()
    if sub.empty:
        return {"group_count": 0, "row_count": 0, "examples": []}
    # Distinct (key, split) pairs, then keys seen with more than one split.
    pairs = sub.drop_duplicates()
    dup = pairs.duplicated(list(question_columns), keep=False)
    if not dup.any():
        return {"group_count": 0, "row_count": 0, "examples": []}
    bad_keys = pairs.loc[dup, list(question_columns)].drop_duplicates()
    bad_rows = sub.merge(bad_keys, on=list(question_columns), how="inner")
    examples: List[Dict[str, Any]] = []
    grouped = (
        pairs.loc[dup]
        .groupby(list(question_columns), sort=True, dropna=True)[split_column]
        .agg(lambda s: sorted(str(v) for v in s))
    )
    for key, splits in grouped.head(MAX_EXAMPLES).items():
        key = key if isinstance(key, tuple) else (key,)
        ex = {c: _plain(v) for c, v in zip(question_columns, key)}
        ex[split_column] = list(splits)
        examples.append(ex)
    return {
        "group_count": int(len(bad_keys)),
        "row_count": int(len(bad_rows)),
        "examples": examples,
    }


def _plain(v: Any) -> Any:
    """numpy scalars -> python scalars (JSON-serialisable)."""
    return v.item() if hasattr(v, "item") else v


class TableAlignflowQuestionSplitConflicts(TableMetricProvider):
    metric_name = METRIC_NAME
    value_keys = ("question_columns", "split_column")

    @metric_value(engine=PandasExecutionEngine)
    def _pandas(
        cls,
        execution_engine: PandasExecutionEngine,
        metric_domain_kwargs: dict,
        metric_value_kwargs: dict,
        metrics: Dict[str, Any],
        runtime_configuration: dict,
    ):
        df, _, _ = execution_engine.get_compute_domain(
            metric_domain_kwargs, domain_type=MetricDomainTypes.TABLE
        )
        return split_conflicts(
            df,
            list(metric_value_kwargs["question_columns"]),
            metric_value_kwargs["split_column"],
        )


class ExpectQuestionIdsInOneSplit(BatchExpectation):
    """Expect every question (``question_columns``) to sit in exactly one split.

    A question whose rows carry two different ``split`` values leaks between
    train / validation / test. Pandas only.
    """

    question_columns: List[str] = ["site", "question_id"]
    split_column: str = "split"

    metric_dependencies: ClassVar[Tuple[str, ...]] = (METRIC_NAME, "table.row_count")
    success_keys: ClassVar[Tuple[str, ...]] = ("question_columns", "split_column")
    args_keys: ClassVar[Tuple[str, ...]] = ("question_columns", "split_column")

    class Config:
        title = "Expect question ids in one split"

    @classmethod
    @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
    def _prescriptive_renderer(cls, configuration=None, result=None, runtime_configuration=None):
        kwargs = configuration.kwargs if configuration is not None else {}
        return _template(
            "Each question ($question_columns) must have a single $split_column value.",
            {
                "question_columns": ", ".join(kwargs.get("question_columns") or ["site", "question_id"]),
                "split_column": kwargs.get("split_column") or "split",
            },
            runtime_configuration,
        )

    def _validate(
        self,
        metrics: Dict,
        runtime_configuration: Optional[dict] = None,
        execution_engine: Optional[Any] = None,
    ):
        observed = metrics[METRIC_NAME]
        rows = metrics.get("table.row_count") or 0
        return {
            "success": observed["group_count"] == 0,
            "result": {
                "observed_value": observed["group_count"],
                "element_count": rows,
                "unexpected_count": observed["row_count"],
                # Data Docs' unexpected-statement renderer needs this key.
                "unexpected_percent": (100.0 * observed["row_count"] / rows) if rows else 0.0,
                "partial_unexpected_list": observed["examples"],
            },
        }


NOT_EQUAL_METRIC = "column_pair_values.alignflow_not_equal"


class ColumnPairValuesAlignflowNotEqual(ColumnPairMapMetricProvider):
    condition_metric_name = NOT_EQUAL_METRIC
    condition_domain_keys = (
        "batch_id",
        "table",
        "column_A",
        "column_B",
        "row_condition",
        "condition_parser",
        "ignore_row_if",
    )
    condition_value_keys = ()

    @column_pair_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_A, column_B, **kwargs):
        return column_A != column_B


class ExpectColumnPairValuesToNotBeEqual(ColumnPairMapExpectation):
    """Expect the values in column A to differ from those in column B, row by row.

    Rows where either value is missing are ignored by default (not-null
    expectations report those). Pandas only.
    """

    ignore_row_if: Literal["both_values_are_missing", "either_value_is_missing", "neither"] = (
        pydantic.Field(default="either_value_is_missing")
    )

    map_metric = NOT_EQUAL_METRIC
    success_keys: ClassVar[Tuple[str, ...]] = ("column_A", "column_B", "ignore_row_if", "mostly")
    args_keys: ClassVar[Tuple[str, ...]] = ("column_A", "column_B")

    class Config:
        title = "Expect column pair values to not be equal"

    @classmethod
    @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
    def _prescriptive_renderer(cls, configuration=None, result=None, runtime_configuration=None):
        kwargs = configuration.kwargs if configuration is not None else {}
        return _template(
            "Values in $column_A must never equal those in $column_B.",
            {"column_A": kwargs.get("column_A"), "column_B": kwargs.get("column_B")},
            runtime_configuration,
        )


def _template(template: str, params: Dict[str, Any], runtime_configuration: Optional[dict]):
    styling = (runtime_configuration or {}).get("styling", {})
    return [
        RenderedStringTemplateContent(
            content_block_type="string_template",
            string_template={"template": template, "params": params, "styling": styling},
        )
    ]
