"""Known answers of the four diagnostics (bptt_harness.diagnose): a dependency of known distance, a linear
recurrence of known weight, and a unigram model whose gradient noise scale has a closed form."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.batching import batchify, get_batch
from bptt_harness.corpus import load
from bptt_harness.diagnose import DiagnoseOptions, context_ladder, context_use, diagnose, gradient_reach, noise_estimates, noise_scale, truncation_bias
from bptt_harness.errors import HarnessError
from bptt_harness.model import ModelFamily, RNNModel, family_of, repackage_hidden
from bptt_harness.spec import FamilyInfo, ModelConfig

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
    assert use.effective_context(values) == K
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
    assert reach.reach() <= 9


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
    rng = torch.random.get_rng_state()
    out = diagnose(model, family("window"), corpus.valid, 4, 4,
                   DiagnoseOptions(positions=16, warm_tokens=8, draws=1, noise_big=8, bias_columns=4), period=K + 1)
    assert torch.equal(torch.random.get_rng_state(), rng)
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
