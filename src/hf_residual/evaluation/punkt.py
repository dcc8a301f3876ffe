"""Offline sentence and word tokenization for lm-eval's IFEval scorer.

lm-eval's ``ifeval`` task imports ``nltk`` and, at import time, downloads the ``punkt_tab`` model when it
is missing; its sentence counter loads ``tokenizers/punkt/english.pickle``, which nltk >= 3.9 serves
from the same ``punkt_tab`` folder. hf-residual ships a small English ``punkt_tab`` of its own
(``nltk_data/`` beside this module: Punkt's default rules plus common abbreviations such as "Dr.", "e.g."),
and puts it on nltk's search path when no punkt is installed, so the scorer runs with no network.
Sentence counts can differ from the trained punkt model only around abbreviations it does not list, so
which punkt scored a run (``punkt_identity``) is part of its results key and is stated in the card.
"""

from __future__ import annotations

from importlib import resources

PUNKT = "tokenizers/punkt_tab/english/"


def packaged_nltk_data() -> str:
    """The folder holding hf-residual's ``tokenizers/punkt_tab/english``."""
    return str(resources.files("hf_residual.evaluation").joinpath("nltk_data"))


def use_offline_punkt() -> str:
    """Make ``nltk.data.find("tokenizers/punkt_tab")`` succeed without a download; returns where it is."""
    import nltk

    try:
        return str(nltk.data.find(PUNKT))
    except LookupError:
        folder = packaged_nltk_data()
        if folder not in nltk.data.path:
            nltk.data.path.append(folder)
        return str(nltk.data.find(PUNKT))


def punkt_identity() -> str:
    """Which punkt lm-eval's IFEval scorer will split sentences with, for result keys and cards:
    ``"packaged sha256:<12 hex>"`` (hf-residual's substitute) or ``"nltk sha256:<12 hex>"`` (a punkt_tab
    installed for nltk), the digest over the model's files so that two different punkts never share a key."""
    import hashlib
    from pathlib import Path

    where = Path(use_offline_punkt())
    packaged = Path(packaged_nltk_data()).resolve()
    source = "packaged" if where.resolve().is_relative_to(packaged) else "nltk"
    digest = hashlib.sha256()
    if where.is_dir():
        for file in sorted(p for p in where.rglob("*") if p.is_file()):
            digest.update(file.relative_to(where).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    else:  # a zipped nltk_data entry: its location is all there is to tell it apart
        digest.update(str(where).encode())
    return f"{source} sha256:{digest.hexdigest()[:12]}"


def describe(identity: str) -> str:
    """A card's words for a ``punkt_identity``."""
    source, _, digest = identity.partition(" ")
    if source == "packaged":
        return f"hf-residual's packaged punkt_tab substitute ({digest}; Punkt's default rules and common abbreviations)"
    return f"nltk's installed punkt_tab ({digest})"
