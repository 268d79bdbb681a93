"""Sample tables and histograms reach every logger that can show them (`infra.media`): TensorBoard, and W&B and
MLflow through their Lightning loggers' public APIs, tested with fake loggers (neither library is installed)."""

from __future__ import annotations

import types

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from rlhf_lightning import GRPOModule, PromptDataModule
from rlhf_lightning.infra import media
from rlhf_lightning.infra.media import log_histogram, log_table, markdown_table


class _Quiet(Logger):
    """What every Lightning logger has; the fakes below add what W&B's and MLflow's loggers add."""

    name, version = "fake", 0

    def __init__(self):
        super().__init__()
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class FakeWandb(_Quiet):
    """`WandbLogger.log_table(key, columns, data, step)`; its experiment (a wandb Run) has no add_text."""

    def __init__(self):
        super().__init__()
        self.tables = []

    @property
    def experiment(self):
        return types.SimpleNamespace(log=lambda *a, **k: None)

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


class FakeMlflowClient:
    def __init__(self):
        self.tables, self.texts = [], []

    def log_table(self, run_id, data, artifact_file):
        self.tables.append((run_id, data, artifact_file))

    def log_text(self, run_id, text, artifact_file):
        self.texts.append((run_id, text, artifact_file))


class FakeMlflow(_Quiet):
    """`MLFlowLogger`: `run_id`, and `experiment` is an `MlflowClient` (log_table / log_text by run id)."""

    def __init__(self):
        super().__init__()
        self.client = FakeMlflowClient()

    @property
    def run_id(self):
        return "run-1"

    @property
    def experiment(self):
        return self.client


class FakeTensorBoard(_Quiet):
    def __init__(self):
        super().__init__()
        self.texts, self.histograms = [], []
        self.writer = types.SimpleNamespace(add_text=lambda *a, **k: self.texts.append((a, k)),
                                            add_histogram=lambda *a, **k: self.histograms.append((a, k)))

    @property
    def experiment(self):
        return self.writer


def test_a_table_goes_to_each_logger_in_its_own_form():
    wandb, mlflow, tb, other = FakeWandb(), FakeMlflow(), FakeTensorBoard(), _Quiet()
    rows = [["1+1=", "2", "2", 1.0], ["2|2=", "a\nb", "None", 0.0]]
    log_table([wandb, mlflow, tb, other], "samples", ["prompt", "completion", "answer", "reward"], rows, step=3)
    assert wandb.tables == [("samples", ["prompt", "completion", "answer", "reward"], rows, 3)]
    (run_id, data, artifact), = mlflow.client.tables
    assert run_id == "run-1" and artifact == "samples/step_0000003.json"
    assert data == {"prompt": ["1+1=", "2|2="], "completion": ["2", "a\nb"], "answer": ["2", "None"],
                    "reward": [1.0, 0.0]}
    (_, text, md_file), = mlflow.client.texts
    assert md_file == "samples/step_0000003.md" and text == markdown_table(["prompt", "completion", "answer",
                                                                            "reward"], rows)
    ((tag, markdown), kwargs), = tb.texts
    assert tag == "samples" and kwargs == {"global_step": 3}
    assert markdown.splitlines() == ["| prompt | completion | answer | reward |", "| --- | --- | --- | --- |",
                                     "| 1+1= | 2 | 2 | 1.000 |", "| 2\\|2= | a⏎b | None | 0.000 |"]
    assert other.metrics == []


class Histogram:
    """wandb.Histogram's stand-in (`media.wandb_histogram` builds the real one)."""

    def __init__(self, values):
        self.values = values.tolist()


def test_histograms_go_to_tensorboard_and_wandb(monkeypatch):
    monkeypatch.setattr(media, "wandb_histogram", Histogram)
    wandb, mlflow, tb = FakeWandb(), FakeMlflow(), FakeTensorBoard()
    log_histogram([wandb, mlflow, tb], "reward/histogram", torch.tensor([1.0, float("nan"), 0.0]), step=5)
    ((metrics, step),) = wandb.metrics
    assert step == 5 and metrics["reward/histogram"].values == [1.0, 0.0]  # NaN dropped
    ((tag, values), kwargs), = tb.histograms
    assert tag == "reward/histogram" and values.tolist() == [1.0, 0.0] and kwargs == {"global_step": 5}
    assert mlflow.client.tables == [] and mlflow.metrics == []  # MLflow has no histograms
    log_histogram([tb], "empty", torch.tensor([float("nan")]), step=0)
    assert len(tb.histograms) == 1


def test_a_grpo_run_logs_its_sample_and_validation_tables_to_wandb_and_mlflow(tmp_path, monkeypatch):
    """The RL sample table (with the extracted answer) and the sampled evaluation's `val/samples`."""
    monkeypatch.setattr(media, "wandb_histogram", Histogram)
    wandb, mlflow = FakeWandb(), FakeMlflow()
    m = GRPOModule("tiny", group_size=2, max_new_tokens=3, log_samples_every_n_steps=1, eval_num_samples=2)
    data = PromptDataModule(task="addition", num_train=8, num_val=4, batch_size=2, val_batch_size=2)
    L.Trainer(max_steps=1, logger=[wandb, mlflow], enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=0,
              default_root_dir=tmp_path).fit(m, data)
    keys = [key for key, *_ in wandb.tables]
    assert keys == ["samples", "val/samples"]
    _, columns, rows, step = wandb.tables[0]
    assert columns == ["prompt", "completion", "answer", "reward", "advantage"] and step == 0 and len(rows) == 4
    _, columns, rows, _ = wandb.tables[1]
    assert columns == ["prompt", "completion", "answer", "correct"] and len(rows) == 2  # one prompt's 2 samples
    assert [a for _, _, a in mlflow.client.tables] == ["samples/step_0000000.json", "val/samples/step_0000001.json"]
    histograms = [name for metrics, _ in wandb.metrics for name, v in metrics.items() if isinstance(v, Histogram)]
    assert histograms == ["reward/histogram", "policy/advantage_histogram"]
