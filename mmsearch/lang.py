"""Which text tower a query goes to: the model's own (English) tower or the multilingual one.

A query is routed in three steps, cheapest first, so that an English query never pays for a
language-ID model:

1. No letters at all (emoji, digits, punctuation, blank after cleaning): undetermined -> "en".
2. Any letter outside the Latin script (Chinese, Japanese, Korean, Cyrillic, Arabic, Greek, Thai,
   ...) -> "multi"; a code-mixed query with such letters too, since the multilingual tower reads
   English as well and the English tower does not read the rest.
3. Latin script: when every word is a whole word of the English tower's vocabulary (``english_words``)
   -> "en"; else Lingua (a language-ID library built for short text) decides among the Latin-script
   languages the multilingual encoder was trained on, and only a query it finds unlikely to be
   English (``ENGLISH_BELOW``) goes to "multi".

How many English captions this sends to the multilingual tower, and how mixed inputs route, is
recorded by ``benchmarks/multilingual.py`` (docs/languages.md).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from typing import Collection

from .errors import BadQueryError

LANGS = ("auto", "en", "multi")  # --lang: route by the text, or force a tower
ENGLISH_BELOW = 0.3  # Lingua's English confidence under which a Latin-script query counts as not English
# Latin-script languages of the multilingual encoder (USE multilingual v3): Lingua chooses among these
LATIN_LANGUAGES = ("ENGLISH", "FRENCH", "GERMAN", "ITALIAN", "DUTCH", "POLISH", "PORTUGUESE", "SPANISH", "TURKISH")
_WORD = re.compile(r"[^\W\d_]+")

_detector = None  # Lingua's detector once built; False: Lingua is not installed
_detector_lock = threading.Lock()


def _is_latin(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith("LATIN")


def _english_confidence(text: str) -> float | None:
    """Lingua's confidence that ``text`` is English, None when Lingua is not installed."""
    global _detector
    with _detector_lock:
        if _detector is None:
            try:
                from lingua import Language, LanguageDetectorBuilder
            except ImportError:
                _detector = False
            else:
                langs = [getattr(Language, name) for name in LATIN_LANGUAGES]
                _detector = LanguageDetectorBuilder.from_languages(*langs).with_low_accuracy_mode().build()
        if _detector is False:
            return None
    from lingua import Language

    return _detector.compute_language_confidence(text, Language.ENGLISH)


def warm_detector() -> None:
    """Build the language-ID model now rather than for the first Latin-script query that needs it."""
    _english_confidence("warm")


def check_lang(lang) -> str:
    """``lang`` if it is one of LANGS, else BadQueryError (one line)."""
    if lang not in LANGS:
        raise BadQueryError(f"unknown language choice {lang!r}: use {', '.join(LANGS)}")
    return lang


def encodable(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (lone surrogates, as undecodable command-line bytes
    become) replaced by "?": the language-ID library and the multilingual tokenizer need UTF-8."""
    return text.encode("utf-8", "replace").decode("utf-8")


def script_route(text: str) -> str | None:
    """Steps 1 and 2 (see the module docstring): "en" or "multi" when the letters decide, None for
    Latin-script text (which ``route`` decides by its words)."""
    # modifier letters (ʼ, ʻ: apostrophes in English text) belong to no language
    letters = [ch for ch in unicodedata.normalize("NFKC", text) if ch.isalpha() and unicodedata.category(ch) != "Lm"]
    if not letters:
        return "en"
    return None if all(_is_latin(ch) for ch in letters) else "multi"


def route(text: str, english_words: Collection[str] | None = None) -> str:
    """"en" or "multi" for one query (see the module docstring)."""
    by_script = script_route(text)
    if by_script is not None:
        return by_script
    text = unicodedata.normalize("NFKC", encodable(text))
    words = _WORD.findall(text.lower())
    if english_words is not None and all(w in english_words for w in words):
        return "en"
    confidence = _english_confidence(text)
    return "multi" if confidence is not None and confidence < ENGLISH_BELOW else "en"
