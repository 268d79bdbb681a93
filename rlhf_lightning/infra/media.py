"""Sample tables and histograms through every Lightning logger of a run that can show them, by its public API.

    TensorBoard (`TensorBoardLogger`, `RunLogger`)  table: a markdown table in the Text tab (`add_text`);
                                                   histogram: the Histograms / Distributions tabs (`add_histogram`)
    Weights & Biases (`WandbLogger`)               table: `WandbLogger.log_table`; histogram: a `wandb.Histogram`
                                                   through `WandbLogger.log_metrics`
    MLflow (`MLFlowLogger`)                        table: the run's artifacts `<tag>/step_<n>.json` (`log_table`,
                                                   shown in MLflow's artifact viewer) and `<tag>/step_<n>.md`
                                                   (`log_text`); no histograms (MLflow has no such type)

A logger is recognised by what it has, not by its class (no logger library is imported here, nor required): a
`log_table` method is W&B's, an experiment with `add_text` / `add_histogram` is a TensorBoard writer, an
experiment with `log_table` plus the logger's `run_id` is an MLflow client. Other loggers are skipped. Call these
on rank 0 only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def markdown_cell(value: Any, limit: int = 200) -> str:
    """A table cell: floats to 3 decimals; `|` escaped, newlines shown as ⏎, at most `limit` characters."""
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", "⏎")[:limit]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _mlflow(logger: Any) -> Any:
    """The MLflow client of an `MLFlowLogger`-like logger, else None."""
    experiment = getattr(logger, "experiment", None)
    has_api = hasattr(experiment, "log_table") and hasattr(experiment, "log_text")
    return experiment if has_api and getattr(logger, "run_id", None) else None


def log_table(loggers: Sequence[Any], tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
              step: int) -> None:
    """One table (`columns`, then one list of values per row) at `step` in every logger that can show it."""
    rows = [list(row) for row in rows]
    for logger in loggers:
        if callable(getattr(logger, "log_table", None)):  # W&B
            logger.log_table(key=tag, columns=list(columns), data=rows, step=step)
            continue
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):  # TensorBoard
            experiment.add_text(tag, markdown_table(columns, rows), global_step=step)
        elif (client := _mlflow(logger)) is not None:
            client.log_table(logger.run_id, data={c: [row[i] for row in rows] for i, c in enumerate(columns)},
                             artifact_file=f"{tag}/step_{step:07d}.json")
            client.log_text(logger.run_id, markdown_table(columns, rows), f"{tag}/step_{step:07d}.md")


def log_histogram(loggers: Sequence[Any], tag: str, values: torch.Tensor, step: int) -> None:
    """A histogram of `values` (NaN dropped; nothing when none is left) in every logger that can show one."""
    x = values.detach().float().flatten().cpu()
    x = x[~torch.isnan(x)]
    if not x.numel():
        return
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):  # TensorBoard
            experiment.add_histogram(tag, x, global_step=step)
        elif callable(getattr(logger, "log_table", None)):  # W&B
            logger.log_metrics({tag: wandb_histogram(x)}, step=step)


def wandb_histogram(values: torch.Tensor) -> Any:
    """A `wandb.Histogram` (wandb is installed wherever a `WandbLogger` runs)."""
    import wandb

    return wandb.Histogram(values.numpy())
