"""Known answers of the four diagnostics (bptt_harness.diagnose): a dependency of known distance, a linear
recurrence of known weight, and a unigram model whose gradient noise scale has a closed form."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.batching import batchify, get_batch
from bptt_harness.cli import main
from bptt_harness.config import parse_study
from bptt_harness.corpus import load
from bptt_harness.diagnose import (
    COLUMNS,
    DiagnoseOptions,
    DiagnosticsObserver,
    context_ladder,
    context_use,
    diagnose,
    gradient_reach,
    noise_estimates,
    noise_scale,
    truncation_bias,
)
from bptt_harness.errors import HarnessError
from bptt_harness.model import ModelFamily, RNNModel, family_of, repackage_hidden
from bptt_harness.record import TrialRecord, flatten
from bptt_harness.report.diagnostics import diagnostics_sentences, load_diagnostics, section, token_costs
from bptt_harness.spec import FamilyInfo, ModelConfig, TrainConfig, TrialSpec
from bptt_harness.trainer import run_trial

K = 8


class WindowModel(nn.Module):
    """A log-linear model of the last ``m`` tokens: logits = a linear map of their embeddings. Its state is
    the last ``m - 1`` embeddings, carried from window to window like an RNN's."""

    def __init__(self, vocab: int, m: int) -> None:
        super().__init__()
        self.m, self.vocab = m, vocab
        self.encoder = nn.Embedding(vocab, vocab)
        nn.init.eye_(self.encoder.weight)
        self.decoder = nn.Linear(m * vocab, vocab)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.cat([state, self.encoder(x)])                        # (m - 1 + L, bs, V)
        feats = seq.unfold(0, self.m, 1)                                  # (L, bs, V, m)
        feats = feats.permute(0, 1, 3, 2).reshape(x.size(0), x.size(1), -1)
        return self.decoder(feats).view(-1, self.vocab), seq[-(self.m - 1):]

    def init_hidden(self, bs: int) -> torch.Tensor:
        return self.encoder.weight.new_zeros(self.m - 1, bs, self.vocab)


class LinearRNN(nn.Module):
    """h_t = a h_{t-1} + e(x_t), logits = W h_t: d h_t / d e_{t-k} = a^k exactly."""

    def __init__(self, vocab: int, a: float) -> None:
        super().__init__()
        self.a = a
        self.encoder = nn.Embedding(vocab, 1)
        self.decoder = nn.Linear(1, vocab)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.encoder(x)
        out = []
        for t in range(x.size(0)):
            h = self.a * h + e[t]
            out.append(h)
        return self.decoder(torch.stack(out)).view(-1, self.decoder.out_features), h

    def init_hidden(self, bs: int) -> torch.Tensor:
        return self.encoder.weight.new_zeros(bs, 1)


class Unigram(nn.Module):
    """Next-token logits that ignore the input: a unigram model."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(vocab))

    def forward(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        return self.theta.expand(x.numel(), -1), state

    def init_hidden(self, bs: int) -> None:
        return None


def family(name: str) -> ModelFamily:
    return ModelFamily(FamilyInfo(name), build=lambda cfg, n: nn.Identity(), flops_per_token=lambda c, n, m: 0.0)


@pytest.fixture(scope="module")
def learned() -> tuple[WindowModel, Any]:
    """A window model trained briefly on synthetic:k=8: it learns the value from the key 8 tokens back."""
    corpus = load(f"synthetic:k={K},vocab=8,noise=2,tokens=20000")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = WindowModel(corpus.vocab_size, 10)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        data = batchify(corpus.train, 32)
        state = model.init_hidden(32)
        for i in range(0, data.size(0) - 1, 20):
            x, y = get_batch(data, i, 20)
            logits, state = model(x, repackage_hidden(state))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, corpus


def value_mask(targets: torch.Tensor, corpus: Any) -> torch.Tensor:
    return torch.tensor([corpus.vocab[t].startswith("val") for t in targets.tolist()])


def test_context_use_steps_down_at_the_dependency(learned: tuple[WindowModel, Any], one_thread: None) -> None:
    model, corpus = learned
    use = context_use(model, family("window"), corpus.valid, list(range(1, 13)), positions=400, warm=16, period=K + 1)
    values = value_mask(use.targets, corpus)
    assert 20 < values.sum() < 100
    curve = use.curve(values)
    assert curve[K - 2] > use.carried_loss(values) + 1.0      # n = 7: the key is replaced, the value is wrong
    assert curve[K - 1] < use.carried_loss(values) + 0.05     # n = 8: the key is real
    # The value tokens' loss is near 0 with the key: within 1% of the carried loss needs more than the
    # key's distance. Over all targets the step decides.
    assert use.effective_context() == K
    others = use.curve(~values & ~torch.tensor([corpus.vocab[t] == "<mark>" for t in use.targets.tolist()]))
    assert max(others) - min(others) < 0.1                   # noise and keys depend on nothing before them


def test_context_use_of_a_memoryless_model_is_one_token(learned: tuple[WindowModel, Any], one_thread: None) -> None:
    _, corpus = learned
    uni = Unigram(corpus.vocab_size)
    use = context_use(uni, family("uni"), corpus.valid, [1, 2, 4], positions=50, warm=8)
    assert use.effective_context() == 1
    assert use.increase() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


def test_gradient_reach_of_values_peaks_at_lag_k_minus_1(learned: tuple[WindowModel, Any], one_thread: None) -> None:
    model, corpus = learned
    reach = gradient_reach(model, family("window"), corpus.valid, 16, positions=400, warm=16)
    values = value_mask(reach.targets, corpus)
    assert reach.peak_lag(values) == K - 1
    assert reach.profile()[10:] == pytest.approx([0.0] * 7)   # the window model sees 10 tokens, no more
    reach_tokens = reach.reach()
    assert reach_tokens is not None and reach_tokens <= 9


def test_linear_rnn_gradient_is_a_to_the_k(one_thread: None) -> None:
    a = 0.8
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = LinearRNN(20, a)
    split = torch.randint(0, 20, (400,), generator=torch.Generator().manual_seed(0))
    reach = gradient_reach(model, family("linear"), split, 30, positions=16, warm=5)
    ratio = reach.norms / reach.norms[0]
    expected = torch.tensor([a ** k for k in range(31)]).unsqueeze(1).expand_as(ratio)
    torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=1e-7)
    assert reach.reach() == max(k for k in range(31) if a ** k >= 0.01)
    assert not reach.censored()


def test_noise_scale_of_a_unigram_model_matches_its_closed_form(one_thread: None) -> None:
    vocab, seq = 30, 16
    p = torch.tensor([1.0 / (r + 1) ** 1.1 for r in range(vocab)], dtype=torch.float64)
    p /= p.sum()
    split = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    model = Unigram(vocab)   # theta = 0: uniform prediction q
    q = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    # per token: G = q - p, Sigma = diag(p) - p p^T  ->  B_noise = tr(Sigma) / |G|^2 tokens
    closed = float((1 - p.pow(2).sum()) / (q - p).pow(2).sum())
    est = noise_scale(model, family("uni"), split, seq, small=1, big=64, draws=200, warm=0)
    assert est.tokens == pytest.approx(closed, rel=0.1)
    assert est.sequences == pytest.approx(closed / seq, rel=0.1)
    assert est.token_cost(closed) == pytest.approx(2.0, rel=0.1)


def test_noise_estimates_invert_the_batch_law() -> None:
    g2, tr = 2.0, 30.0
    assert noise_estimates(g2 + tr / 4, g2 + tr / 32, 4, 32) == pytest.approx((g2, tr))


def test_truncation_bias_vanishes_at_the_window_and_is_zero_without_memory(
        learned: tuple[WindowModel, Any], one_thread: None) -> None:
    model, corpus = learned
    bias = truncation_bias(model, family("window"), corpus.valid, [1, 2, 4, 8, 9, 10, 16], 32, columns_per_draw=8,
                           draws=2, warm=16, tolerance=0.05)
    b = dict(zip(bias.ladder, bias.bias))
    assert b[1] > 0.05 and b[4] > b[8] > 0
    # The window model reads 10 tokens: truncating at >= 10 still cuts the gradient for the first rows of
    # each window, so the bias falls with K (as about 1/K) but is not zero.
    assert b[16] < b[4]
    uni = truncation_bias(Unigram(corpus.vocab_size), family("uni"), corpus.valid, [1, 2], 8, draws=1, warm=4)
    assert uni.bias == pytest.approx([0.0, 0.0], abs=1e-6)
    assert uni.smallest_k == 1


def test_diagnose_leaves_the_model_and_the_process_as_found(learned: tuple[WindowModel, Any],
                                                             one_thread: None) -> None:
    model, corpus = learned
    model.train()
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    rng, cudnn = torch.random.get_rng_state(), torch.backends.cudnn.enabled
    out = diagnose(model, family("window"), corpus.valid, 4, 4,
                   DiagnoseOptions(positions=16, warm_tokens=8, bias_draws=1, noise_draws=1, noise_big=8, bias_columns=4), period=K + 1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.backends.cudnn.enabled == cudnn
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    summary = out.summary()
    assert set(summary) == {"effective_context_tokens", "gradient_reach_tokens", "truncation_bias_k",
                            "noise_scale_tokens"}
    assert summary["effective_context_tokens"] in (8, 16)
    assert out.curves()["context"]["n"] == context_ladder(4) == [1, 2, 4, 8, 16]


def test_lstm_and_the_embedding_hook(one_thread: None) -> None:
    """A built-in family (an LSTM, cuDNN's on GPU) is measured through its embedding's output."""
    corpus = load("synthetic:k=4,vocab=8,noise=4,tokens=5000")
    cfg = ModelConfig(type="lstm", emsize=8, nhid=8, layers=1, dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = RNNModel(cfg, corpus.vocab_size)
    reach = gradient_reach(model, family_of(cfg), corpus.valid, 12, positions=8, warm=4)
    assert reach.norms.shape == (13, 8) and reach.norms[0].min() > 0


def test_no_reach_when_the_output_ignores_the_input(one_thread: None) -> None:
    model = LinearRNN(10, 0.5)
    with torch.no_grad():
        model.decoder.weight.zero_()   # the loss no longer depends on the input at all
    split = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(0))
    reach = gradient_reach(model, family("linear"), split, 5, positions=4, warm=2)
    assert reach.reach() is None and not reach.censored()


def test_a_model_without_embedding_is_one_line_error(one_thread: None) -> None:
    with pytest.raises(HarnessError, match="nn.Embedding"):
        gradient_reach(Unigram(5), family("uni"), torch.zeros(100, dtype=torch.long), 3, positions=4, warm=1)


@pytest.mark.parametrize("bad, match", [({"positions": 0}, "positions=0"), ({"context_tolerance": 1.5}, "(0, 1)"),
                                        ({"measure": ["context", "nope"]}, "measure"),
                                        ({"noise_small": 3, "noise_big": 8}, "multiple")])
def test_options_are_checked(bad: dict, match: str) -> None:
    with pytest.raises(HarnessError, match=match):
        DiagnoseOptions(**bad)


def test_ladder_reaches_the_factor() -> None:
    assert context_ladder(35) == [1, 2, 4, 8, 16, 32, 64, 128, 140]


# --------------------------------------------------------------------------- the sentences

ROW = {"bptt": 35, "batch_size": 20, "effective_context_tokens": 64, "gradient_reach_tokens": 40,
       "truncation_bias_k": 32, "noise_scale_tokens": 2400.0, "bias_tolerance": 0.05}


def test_each_sentence_is_said_from_its_number() -> None:
    (text,) = diagnostics_sentences([ROW])
    assert text == ("Trained with bptt 35, the model uses about 64 tokens of context; gradients reach about 40 tokens "
                    "back; a bptt above 32 changes the gradient by less than 5%; batches above "
                    "about 2,400 tokens per step gain little per token at this loss.")


@pytest.mark.parametrize("missing, absent", [
    ("effective_context_tokens", "tokens of context"), ("gradient_reach_tokens", "reach about"),
    ("truncation_bias_k", "changes the gradient"), ("noise_scale_tokens", "gain little per token")])
@pytest.mark.parametrize("value", [None, float("nan"), float("inf"), 0, "x"])
def test_a_sentence_is_not_said_without_its_number(missing: str, absent: str, value: Any) -> None:
    (text,) = diagnostics_sentences([{**ROW, missing: value}])
    assert absent not in text
    assert text.startswith("Trained with bptt 35")


def test_nothing_measured_says_nothing() -> None:
    assert diagnostics_sentences([{"bptt": 35, "batch_size": 20}]) == []
    assert diagnostics_sentences([]) == []


# --------------------------------------------------------------------------- the study file

def test_an_empty_diagnostics_table_is_every_measurement_with_the_defaults() -> None:
    base = {"name": "d", "search": {"bptt": [4], "batch_size": [2]}}
    assert parse_study(base).diagnostics is None
    assert parse_study({**base, "diagnostics": {}}).diagnostics == DiagnoseOptions()
    picked = parse_study({**base, "diagnostics": {"measure": ["noise"], "every": 2}}).diagnostics
    assert picked is not None and picked.measure == ("noise",) and picked.every == 2


@pytest.mark.parametrize("table, match", [
    ({"positons": 3}, "unknown key \\[diagnostics\\] 'positons' \\(did you mean 'positions'\\?\\)"),
    ({"measure": "noise"}, "must be a list"), ({"measure": ["nose"]}, "measure"),
    ({"every": 0}, "every=0"), ({"bias_tolerance": "x"}, "must be a number"), ({"save_model": 1}, "true or false")])
def test_a_bad_diagnostics_key_is_one_line(table: dict, match: str) -> None:
    with pytest.raises(HarnessError, match=match) as e:
        parse_study({"name": "d", "search": {"bptt": [4], "batch_size": [2]}, "diagnostics": table})
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- per trial, and the command

def test_a_trial_records_its_diagnostics_apart_from_training(tmp_path: Path, one_thread: None) -> None:
    corpus = load("synthetic:k=4,vocab=8,noise=4,tokens=6000")
    spec = TrialSpec(bptt=8, batch_size=4, model=ModelConfig(emsize=8, nhid=8, layers=1, dropout=0.0),
                     train=TrainConfig(optimizer="adamw", lr=0.01, tokens=1200, checkpoints=2, eval_bptt=16))
    options = DiagnoseOptions(positions=8, warm_tokens=4, bias_columns=2, noise_big=8, save_model=True)
    seen: list[float] = []

    class Clock(DiagnosticsObserver):
        def after_training(self, loop: Any) -> None:
            super().after_training(loop)
            seen.append(loop.clock.paused_by.get("diagnose", 0.0))

    result = run_trial(spec, corpus, "cpu", observers=[Clock(options, 8, period=5, model_dir=tmp_path)])
    assert result.status == "ok", result.error
    assert [p["phase"] for p in result.diagnostics] == ["checkpoint", "end"]   # the last checkpoint is the end
    assert result.effective_context_tokens == result.diagnostics[-1]["effective_context_tokens"]
    assert result.noise_scale_tokens == result.diagnostics[-1]["noise_scale_tokens"]
    assert result.diagnose_s is not None and seen and seen[0] > 0   # the training clock was paused for them
    assert result.diagnose_s == pytest.approx(seen[0], rel=0.5)
    saved = torch.load(result.model_path, weights_only=False)
    assert saved["bptt"] == 8 and set(saved["state_dict"]) == set(RNNModel(spec.model, corpus.vocab_size).state_dict())
    row = flatten(TrialRecord(result=result))
    assert {"effective_context_tokens", "noise_scale_tokens", "diagnose_s"} <= set(row)


def test_the_diagnose_command_writes_a_row_per_shape_and_phase(tmp_path: Path, capsys: Any) -> None:
    study = tmp_path / "s.toml"
    study.write_text('name = "s"\n[corpus]\nsource = "synthetic:k=4,vocab=8,noise=2,tokens=6000"\n'
                     '[model]\nemsize = 8\nnhid = 8\nlayers = 1\ndropout = 0.0\n'
                     '[train]\noptimizer = "adamw"\nlr = 0.01\neval_bptt = 16\n'
                     '[search]\nbptt = [4, 8]\nbatch_size = [4]\n'
                     '[diagnostics]\npositions = 8\nwarm_tokens = 4\nbias_columns = 2\nnoise_big = 8\n')
    assert main(["diagnose", str(study), "--tokens", "800", "--results-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert "diagnostics:" in out.out and "bptt     8" in out.err
    frame = pd.read_csv(tmp_path / "r" / "s" / "diagnostics.csv")
    assert list(zip(frame["bptt"], frame["phase"])) == [(4, "init"), (4, "trained"), (8, "init"), (8, "trained")]
    assert set(COLUMNS) <= set(frame.columns)
    doc = load_diagnostics(tmp_path / "r" / "s")
    assert doc is not None
    html = section(doc, None, [4])
    assert "What bptt does to the model" in html and html.count("<figure>") == 4
    assert section(None, None) == ""
    assert main(["diagnose", str(study), "--tokens", "0", "--results-dir", str(tmp_path / "r")]) == 2


def test_the_diagnose_command_takes_all_four_whatever_the_study_measures_per_trial(tmp_path: Path) -> None:
    study = tmp_path / "s.toml"
    study.write_text('name = "s"\n[corpus]\nsource = "synthetic:k=4,vocab=8,noise=2,tokens=6000"\n'
                     '[model]\nemsize = 8\nnhid = 8\nlayers = 1\ndropout = 0.0\n'
                     '[train]\noptimizer = "adamw"\nlr = 0.01\neval_bptt = 16\n'
                     '[search]\nbptt = [4]\nbatch_size = [4]\n'
                     '[diagnostics]\nmeasure = ["context"]\npositions = 8\nwarm_tokens = 4\nbias_columns = 2\n'
                     'noise_big = 8\n')
    assert main(["diagnose", str(study), "--tokens", "800", "--results-dir", str(tmp_path / "r")]) == 0
    trained = pd.read_csv(tmp_path / "r" / "s" / "diagnostics.csv").query("phase == 'trained'").iloc[0]
    for column in ("effective_context_tokens", "gradient_reach_tokens", "truncation_bias_k", "noise_scale_tokens"):
        assert pd.notna(trained[column]), column


def test_shapes_that_share_a_bptt_are_told_apart_by_batch_size() -> None:
    texts = diagnostics_sentences([ROW, {**ROW, "batch_size": 80}, {**ROW, "bptt": 70}])
    assert [t.split(",")[0] for t in texts] == ["Trained with bptt 35 and batch size 20",
                                               "Trained with bptt 35 and batch size 80", "Trained with bptt 70"]


def _doc() -> dict:
    curves = {"context": {"n": [1, 2, 4, 8], "loss": [5.0, 4.8, 4.7, 4.69], "carried_loss": 4.69, "tolerance": 0.01},
              "reach": {"norm": [1.0, 0.5, 0.1, 0.001], "fraction": 0.01, "censored": False},
              "bias": {"k": [2, 8], "bias": [0.3, 0.05], "long": 16, "tolerance": 0.1}}
    row = {"model": "lstm 1x8", "bptt": 35, "batch_size": 20, "phase": "trained", "tokens": 100, "val_ppl": 90.0,
           "effective_context_tokens": 8, "gradient_reach_tokens": 2, "truncation_bias_k": 8,
           "noise_scale_tokens": 500.0, "seconds": 1.0, "context_tolerance": 0.01, "reach_fraction": 0.01,
           "bias_tolerance": 0.1, "status": "ok", "curves": curves}
    return {"study": "s", "tokens": 100, "options": {}, "rows": [{**row, "phase": "init", "curves": {}}, row]}


def test_the_report_shows_the_diagnostics_where_there_are_some(tmp_path: Path) -> None:
    from synthetic import synthetic_records

    from bptt_harness.report import generate_from_records

    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20,))
    plain = generate_from_records(recs, study_name="s", out_dir=tmp_path / "plain").html.read_text()
    assert 'id="diagnostics"' not in plain
    (tmp_path / "diag").mkdir()
    (tmp_path / "diag" / "diagnostics.json").write_text(json.dumps(_doc()))
    for rec in recs:
        rec["result"]["effective_context_tokens"] = 16
    html = generate_from_records(recs, study_name="s", out_dir=tmp_path / "diag").html.read_text()
    assert 'id="diagnostics"' in html
    assert "Trained with bptt 35, the model uses about 8 tokens of context" in html   # diagnose's short run
    assert "uses about 16 tokens of context" in html                                # the trials' own
    assert "Context use: how many tokens the model reads" in html
    trials = pd.read_csv(tmp_path / "diag" / "trials.csv")
    assert set(COLUMNS) <= set(trials.columns) and set(trials["effective_context_tokens"]) == {16}


def test_token_cost_follows_the_noise_scale() -> None:
    assert token_costs([ROW], [20, 80]) == [(35, 20, pytest.approx(1 + 700 / 2400)),
                                            (35, 80, pytest.approx(1 + 2800 / 2400))]
    assert token_costs([{**ROW, "noise_scale_tokens": None}], [20]) == []
