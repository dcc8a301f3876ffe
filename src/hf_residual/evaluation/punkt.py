"""Offline sentence and word tokenization for lm-eval's IFEval scorer.

lm-eval's ``ifeval`` task imports ``nltk`` and, at import time, downloads the ``punkt_tab`` model when it
is missing; its sentence counter loads ``tokenizers/punkt/english.pickle``, which nltk >= 3.9 serves
from the same ``punkt_tab`` folder. hf-residual ships a small English ``punkt_tab`` of its own
(``nltk_data/`` beside this module: Punkt's default rules plus common abbreviations such as "Dr.", "e.g."),
and puts it on nltk's search path when no punkt is installed, so the scorer runs with no network.
Sentence counts can differ from the trained punkt model only around abbreviations it does not list.
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
