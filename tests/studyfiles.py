"""A test fixture: tiny study files (a small LSTM on a synthetic corpus), written where a test wants them."""

from __future__ import annotations

from pathlib import Path

TINY = """
name = "{name}"
sampler = "{sampler}"
objectives = {objectives}
{top}

[corpus]
source = "{corpus}"

[model]
emsize = 8
nhid = 16
layers = 1
dropout = 0.0

[train]
optimizer = "adamw"
lr = 0.01
clip = 1.0
tokens = {tokens}
checkpoints = 2
eval_bptt = 64
{train}

[search]
{search}
"""


def write_study(tmp_path: Path, name: str = "tiny", *, sampler: str = "grid", objectives: str = '["val_ppl"]',
                top: str = "", train: str = "", tokens: int = 2000, corpus_tokens: int = 8000, corpus: str | None = None,
                search: str = "bptt = [4, 8]\nbatch_size = [4]") -> Path:
    """``tmp_path/<name>.toml``: a grid study of a tiny model; ``top``/``train`` add lines to their tables."""
    path = tmp_path / f"{name}.toml"
    source = corpus or f"synthetic:k=4,vocab=6,noise=2,tokens={corpus_tokens}"
    path.write_text(TINY.format(name=name, sampler=sampler, objectives=objectives, top=top, train=train,
                                tokens=tokens, corpus=source, search=search))
    return path


# A tiny study of any model: the [model] table is the test's (a family, a factory, a registered type).
MODEL_STUDY = """
name = "{name}"
sampler = "grid"

[corpus]
source = "synthetic:k=4,vocab=6,noise=2,tokens=6000"

[model]
{model}

[train]
optimizer = "adamw"
lr = 0.01
clip = 1.0
tokens = 1200
checkpoints = 2
eval_bptt = 16
warmup_steps = 1

[search]
bptt = {bptts}
batch_size = {batch_sizes}
"""


def write_model_study(tmp_path: Path, name: str, model: str, *, bptts: str = "[4, 8]", batch_sizes: str = "[4]") -> Path:
    """``tmp_path/<name>.toml``: :data:`MODEL_STUDY` with ``model`` as its ``[model]`` table."""
    path = tmp_path / f"{name}.toml"
    path.write_text(MODEL_STUDY.format(name=name, model=model, bptts=bptts, batch_sizes=batch_sizes))
    return path
