"""The Python API (issue 14, item 2): load_results, run_study, run_trial from ``import bptt_harness``, and a
user's own model from ``[model] factory`` (the models are defined right here)."""

from __future__ import annotations

import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import bptt_harness
from bptt_harness.cli import main
from bptt_harness.config import parse_study
from bptt_harness.errors import HarnessError
from bptt_harness.model import check_model
from bptt_harness.spec import ModelConfig

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{__name__}:tiny_gru"

STUDY = """
name = "own-model"
sampler = "grid"

[corpus]
source = "synthetic:k=4,vocab=6,noise=2,tokens=8000"

[model]
factory = "{factory}"
emsize = 8
nhid = 12

[train]
optimizer = "adamw"
lr = 0.01
clip = 1.0
tokens = 1500
checkpoints = 2
eval_bptt = 64

[search]
bptt = [4, 8]
batch_size = [4]
"""


class TinyGRU(nn.Module):
    """A user's model: one GRU layer, no dropout, its own state."""

    def __init__(self, cfg: ModelConfig, ntoken: int) -> None:
        super().__init__()
        self.nhid = cfg.nhid
        self.emb = nn.Embedding(ntoken, cfg.emsize)
        self.rnn = nn.GRU(cfg.emsize, cfg.nhid)
        self.out = nn.Linear(cfg.nhid, ntoken)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, hidden = self.rnn(self.emb(x), hidden)
        return self.out(y).view(-1, self.out.out_features), hidden

    def init_hidden(self, bs: int) -> torch.Tensor:
        return torch.zeros(1, bs, self.nhid, device=self.out.weight.device)


class Unflattened(TinyGRU):
    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, hidden = self.rnn(self.emb(x), hidden)
        return self.out(y), hidden  # (seq_len, bs, ntoken): not what the loss takes


class BatchMajor(TinyGRU):
    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, hidden = self.rnn(self.emb(x), hidden)
        # The right shape, the wrong order: row b * seq_len + t, so the loss meets other positions' targets.
        return self.out(y).transpose(0, 1).reshape(-1, self.out.out_features), hidden


def batch_major(cfg: ModelConfig, ntoken: int) -> nn.Module:
    return BatchMajor(cfg, ntoken)


def tiny_gru(cfg: ModelConfig, ntoken: int) -> nn.Module:
    return TinyGRU(cfg, ntoken)


def unflattened(cfg: ModelConfig, ntoken: int) -> nn.Module:
    return Unflattened(cfg, ntoken)


def not_a_module(cfg: ModelConfig, ntoken: int) -> str:
    return "a model"


def no_init_hidden(cfg: ModelConfig, ntoken: int) -> nn.Module:
    return nn.Linear(2, 2)


def broken(cfg: ModelConfig, ntoken: int) -> nn.Module:
    raise ValueError("no weights here\nsecond line")


NOT_CALLABLE = 3


def test_load_results_gives_the_rows_of_trials_csv(smoke_results: Path) -> None:
    df = bptt_harness.load_results(smoke_results)
    text = (smoke_results / "trials.csv").read_text()
    assert len(df) == 4 and list(df.columns) == list(pd.read_csv(smoke_results / "trials.csv").columns)
    assert df.to_csv(index=False, lineterminator="\n") == text  # the same rows, cell for cell
    by_url = bptt_harness.load_results(f"sqlite:///{smoke_results / 'study.db'}")
    assert by_url.to_csv(index=False, lineterminator="\n") == text


def test_load_results_of_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="does not exist") as e:
        bptt_harness.load_results(tmp_path / "nothing")
    assert "\n" not in str(e.value)


def test_importing_harness_loads_no_torch_and_changes_no_setting() -> None:
    code = ("import os, sys; before = dict(os.environ); import bptt_harness; f = bptt_harness.load_results; "
            "assert dict(os.environ) == before; print('torch' in sys.modules, callable(f))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "True"]


def test_run_trial_from_the_package(one_thread: None, syn) -> None:
    spec = bptt_harness.TrialSpec(bptt=8, batch_size=4, model=bptt_harness.ModelConfig(emsize=8, nhid=8, layers=1, dropout=0.0),
                             train=bptt_harness.TrainConfig(optimizer="adamw", lr=0.01, tokens=1000, checkpoints=1))
    result = bptt_harness.run_trial(spec, syn, "cpu")
    assert result.status == "ok" and result.train_tokens == 1000 and math.isfinite(result.val_ppl)


def test_run_study_trains_a_users_own_model(tmp_path: Path, one_thread: None) -> None:
    study_file = tmp_path / "own-model.toml"
    study_file.write_text(STUDY.format(factory=FACTORY))
    config = parse_study(tomllib.loads(study_file.read_text()), study_file)
    paths = bptt_harness.run_study(config, results_dir=tmp_path / "results", quiet=True)
    assert paths.html == tmp_path / "results" / "own-model" / "report.html" and paths.html.is_file()
    df = bptt_harness.load_results(paths.html.parent)
    assert len(df) == 2 and set(df["status"]) == {"ok"}
    assert set(df["model"]) == {FACTORY}  # the report names the user's model
    ntoken = int(df["vocab_size"].iloc[0])
    assert set(df["n_params"]) == {sum(p.numel() for p in TinyGRU(ModelConfig(emsize=8, nhid=12), ntoken).parameters())}
    # The study file's path works too; a finished study trains nothing more.
    again = bptt_harness.run_study(study_file, results_dir=tmp_path / "results", quiet=True)
    assert again.csv == paths.csv and len(bptt_harness.load_results(paths.html.parent)) == 2


def test_harness_trial_runs_a_users_own_model(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    args = ["trial", "--source", "synthetic:k=4,vocab=6,tokens=5000", "--bptt", "8", "--batch-size", "4",
            "--factory", FACTORY, "--emsize", "8", "--nhid", "8", "--optimizer", "adamw", "--lr", "0.01",
            "--tokens", "1000", "--checkpoints", "1", "--device", "cpu", "--no-probe", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    vocab = bptt_harness.load_corpus("synthetic:k=4,vocab=6,tokens=5000").vocab_size
    assert result["status"] == "ok"
    assert result["n_params"] == sum(p.numel() for p in TinyGRU(ModelConfig(emsize=8, nhid=8), vocab).parameters())


@pytest.mark.parametrize("factory, message", [
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
    (f"{__name__}:tiny_gruu", "has no 'tiny_gruu' (did you mean 'tiny_gru'?)"),
    (f"{__name__}:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a function"),
    (f"{__name__}:broken", "raised ValueError: no weights here"),
    (f"{__name__}:not_a_module", "returned str, not a torch.nn.Module"),
    (f"{__name__}:no_init_hidden", "Linear has no init_hidden(batch_size)"),
    (f"{__name__}:unflattened", "must return (logits of shape (seq_len * batch_size, ntoken) = (6, 5), hidden)"),
    (f"{__name__}:batch_major", "changed logits rows [2], but only row 4 may change: the logits must be "
                                "sequence-major"),
])
def test_a_bad_factory_is_one_line(factory: str, message: str) -> None:
    with pytest.raises(HarnessError) as e:
        check_model(ModelConfig(factory=factory, emsize=4, nhid=4), 5)
    assert message in str(e.value) and "\n" not in str(e.value) and factory in str(e.value)


def test_a_sequence_major_factory_passes_the_ordering_check() -> None:
    model_cfg = ModelConfig(factory=FACTORY, emsize=4, nhid=4, dropout=0.5)
    check_model(model_cfg, 5)  # TinyGRU: sequence-major, as the trainer's loss reads it


@pytest.mark.parametrize("factory", ["mymodels", "mymodels:", "my-models:make", ":make", "a.b:c.d"])
def test_a_factory_that_is_not_module_colon_function_is_refused_when_parsed(factory: str) -> None:
    raw = {"name": "x", "model": {"factory": factory}, "search": {"bptt": [4], "batch_size": [4]}}
    with pytest.raises(HarnessError, match="must be 'package.module:function'"):
        parse_study(raw)


def test_a_sweep_with_a_bad_factory_stops_before_writing_anything(tmp_path: Path, capsys) -> None:
    study_file = tmp_path / "own-model.toml"
    study_file.write_text(STUDY.format(factory=f"{__name__}:tiny_gruu"))
    assert main(["sweep", str(study_file), "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'tiny_gru'" in err
    assert not (tmp_path / "results").exists()
