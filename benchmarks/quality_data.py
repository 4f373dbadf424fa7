"""The real labelled text of the quality study, read from files that installed wheels ship (no hub, no network).

Two binary tasks, 200 examples each, balanced:

- ``polarity``: movie-review sentences (Pang & Lee), ``__label__pos`` / ``__label__neg``, from gensim's
  ``test/test_data/pang_lee_polarity.cor``.
- ``newsgroups``: 20-Newsgroups posts from alt.atheism and sci.space, from gensim's ``test/test_data/mini_newsgroup``
  (a zlib-compressed pickle of a scikit-learn Bunch). The headers name the group (``Newsgroups: alt.atheism``), so
  only the body is kept, without quoted lines or their attribution: the task is to read the author's own words.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import re
import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """A labelled text set: ``labels[i]`` is the class index of ``texts[i]`` into ``classes``."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]


def gensim_test_data() -> str:
    """The folder of real text that gensim's wheel ships; found without importing gensim (slow, pulls scipy)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the quality study reads its text from gensim's wheel: pip install gensim==4.4.0")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"gensim is installed but ships no test data at {folder}: reinstall gensim==4.4.0")
    return folder


def polarity(folder: str | None = None) -> Task:
    """Pang & Lee movie-review sentences: one ``__label__pos|neg sentence`` per line (cp1252: it holds 0x97 dashes)."""
    path = os.path.join(folder or gensim_test_data(), "pang_lee_polarity.cor")
    classes = ("neg", "pos")
    texts, labels = [], []
    with open(path, encoding="cp1252") as f:
        for number, line in enumerate(f, 1):
            tag, _, text = line.strip().partition(" ")
            if not tag.startswith("__label__") or tag[len("__label__") :] not in classes or not text:
                raise ValueError(f"{path}:{number}: expected '__label__pos|neg <sentence>', got {line[:60]!r}")
            texts.append(text)
            labels.append(classes.index(tag[len("__label__") :]))
    return Task("polarity", tuple(texts), tuple(labels), classes)


class _Bunch(dict):
    """Stands in for scikit-learn's Bunch while unpickling, so that neither scikit-learn nor its old module path is
    needed."""

    def __setstate__(self, state):
        self.update(state)


class _BunchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("sklearn."):
            return _Bunch
        return super().find_class(module, name)


QUOTE = re.compile(r"^\s*([A-Za-z]{0,3}>|\||:)")  # quoted text of the post answered ('>', 'MB>', '|', ':')
ATTRIBUTION = re.compile(r"(writes|wrote|says):\s*$|^In article\b", re.IGNORECASE)
# Header lines also turn up inside bodies (forwarded posts); some name the group.
HEADER = re.compile(
    r"^\s*(To|From|Newsgroups|Path|Subject|Message-ID|Organization|Date|Lines|References|Sender|"
    r"Distribution|NNTP-Posting-Host|Reply-To|Keywords|Summary|Expires|Followup-To|Article-I\.D\.|"
    r"X-[\w-]+):",
    re.IGNORECASE,
)


def post_body(post: str) -> str:
    """The author's own words in a Usenet post: no headers (they name the group), no quotes, no attribution lines."""
    _, _, body = post.partition("\n\n")
    kept = [
        line
        for line in body.splitlines()
        if not QUOTE.match(line) and not ATTRIBUTION.search(line) and not HEADER.match(line)
    ]
    return " ".join(" ".join(kept).split())


def newsgroups(folder: str | None = None) -> Task:
    """200 posts of alt.atheism and sci.space, bodies only (see ``post_body``)."""
    path = os.path.join(folder or gensim_test_data(), "mini_newsgroup")
    with open(path, "rb") as f:
        bunch = _BunchUnpickler(io.BytesIO(zlib.decompress(f.read()))).load()
    texts = tuple(post_body(post) for post in bunch["data"])
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        raise ValueError(f"{path}: posts {empty[:5]} have no body left after removing headers and quotes")
    classes = tuple(str(c) for c in bunch["target_names"])
    return Task("newsgroups", texts, tuple(int(t) for t in bunch["target"]), classes)


TASKS = {"polarity": polarity, "newsgroups": newsgroups}
