"""Text normalization for the content filter: one canonical form that trivial evasions cannot dodge.

`normalize(text)` is what filter rules are matched against: Unicode compatibility forms folded
(NFKD, so fullwidth and math letters become ASCII), invisible and format characters removed,
accents on Latin letters stripped, Cyrillic/Greek look-alikes mapped to Latin, case folded,
leetspeak digits inside words read as letters, punctuation between letters dropped
("i.g.n.o.r.e" -> "ignore"), runs of spaced-out single letters joined ("i g n o r e" ->
"ignore"), every other punctuation and whitespace run collapsed to one space. Apostrophes and
quotes between letters vanish ("don't" -> "dont").

`normalize_quoted` is the same form with quotation marks kept as `"`, so the filter can tell a
phrase that is quoted (talked about) from one that is said. `hidden_text` recovers text smuggled
in Unicode tag characters, which some models read although nothing shows on screen.
"""

from __future__ import annotations

import re
import unicodedata

_QUOTE = '"'
_GAP = "\x1f"  # punctuation or symbol: dropped between letters, a space elsewhere
_CACHE_LIMIT = 65_536

_QUOTES = frozenset(
    "\"'`\u00ab\u00bb\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u2039\u203a\u300c\u300d\u300e\u300f"
)
_LEET_SIGNS = frozenset("@$")
# Invisible characters outside the Cf category: variation selectors, fillers, joiners.
_INVISIBLE_EXTRA = frozenset(
    [
        *(0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x3164, 0xFFA0),
        *range(0xFE00, 0xFE10),
        *range(0xE0100, 0xE01F0),
    ]
)
_BLANK_EXTRA = frozenset([0x2800])  # braille blank renders as a space


class _CharTable(dict[int, str | None]):
    """str.translate table classifying each code point once (by Unicode category) and caching it."""

    def __missing__(self, cp: int) -> str | None:
        mapped = _classify(cp)
        if len(self) < _CACHE_LIMIT:
            self[cp] = mapped
        return mapped


def _classify(cp: int) -> str | None:
    char = chr(cp)
    if cp in _INVISIBLE_EXTRA:
        return None
    if char in _QUOTES:
        return _QUOTE
    if char in _LEET_SIGNS:
        return char
    if cp in _BLANK_EXTRA:
        return " "
    category = unicodedata.category(char)
    if category in ("Cf", "Co", "Cn", "Cs"):
        return None
    if category[0] in "ZC":
        return " "
    if category[0] in "PS":
        return _GAP
    return char


_CHARS = _CharTable()

# Look-alikes of Latin letters in Cyrillic, Greek and Armenian (and a few Latin variants);
# the ambiguous characters are the point here.
_CONFUSABLES = str.maketrans(
    {
        **dict(zip("АВЕКМНОРСТУХЅІЈԀҺԚԜӀҮ", "ABEKMHOPCTYXSIJDHQWIY", strict=True)),
        **dict(zip("авекмнорстухѕіјԁһԛԝӏүьп", "abekmhopctyxsijdhqwlybn", strict=True)),
        **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEZHIKMNOPTYX", strict=True)),  # noqa: RUF001
        **dict(zip("αβεηικνορτυχγωϲϳ", "abenikvoptuxywcj", strict=True)),
        **dict(zip("օսհոɡɑıɩ", "ouhngaii", strict=True)),  # noqa: RUF001
    }
)
_LOOKALIKE_SCRIPTS = re.compile("[\u0370-\u03ff\u0400-\u052f\u0530-\u058f\u0261\u0251\u0131\u0269]")
_LATIN = re.compile("[A-Za-z]")
_WORD = re.compile(r"\w+")
_LOOKALIKE_LETTER = re.compile("[\u0370-\u058f]")

# Combining marks after anything but a Cyrillic letter (one after Cyrillic is kept: й, ё).
_MARKS = re.compile("(?<![\u0400-\u04ff])[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")
_TAGS = re.compile("[\U000e0000-\U000e007f]")

_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_LEET_TOKEN = re.compile(r"(?<!\S)\S*[013457@$]\S*")
_LETTER = re.compile("[a-z]")

_GAP_BETWEEN_LETTERS = re.compile(f"(?<=[^\\W_])[{_GAP}{_QUOTE}]+(?=[^\\W_])")
_GAP_AT_WORD_EDGE = re.compile(f" ?{_GAP}+ ?")
_SPACED_LETTERS = re.compile(r"(?<!\S)(?:[^\W_] ){2,}[^\W_](?!\S)")


def normalize(text: str) -> str:
    """The canonical form filter rules match: see the module docstring."""
    return _finish(_prepare(text).replace(_QUOTE, " "))


def normalize_quoted(text: str) -> str:
    """`normalize`, but quotation marks around words stay (as `"`)."""
    return _finish(_prepare(text))


def hidden_text(text: str) -> str:
    """ASCII smuggled in Unicode tag characters (U+E0020..U+E007E); empty when there is none."""
    if text.isascii() or not _TAGS.search(text):
        return ""
    return "".join(chr(ord(c) - 0xE0000) for c in text if 0xE0020 <= ord(c) <= 0xE007E)


def _prepare(text: str) -> str:
    if text.isascii():
        prepared = text.translate(_CHARS).lower()
    else:
        prepared = unicodedata.normalize("NFKD", text).translate(_CHARS)
        prepared = unicodedata.normalize("NFC", _MARKS.sub("", prepared))
        prepared = _unconfuse(prepared).casefold()
    if _LEET_TOKEN.search(prepared):
        prepared = _LEET_TOKEN.sub(_read_leet, prepared)
    prepared = prepared.replace("@", _GAP).replace("$", _GAP)
    return _GAP_AT_WORD_EDGE.sub(" ", _GAP_BETWEEN_LETTERS.sub("", prepared))


def _finish(prepared: str) -> str:
    # Spaced-out letters are joined before collapsing: a wider gap still separates words.
    if _SPACED_LETTERS.search(prepared):
        prepared = _SPACED_LETTERS.sub(lambda m: m.group().replace(" ", ""), prepared)
    return " ".join(prepared.split())


def _unconfuse(text: str) -> str:
    """Map look-alikes to Latin: everywhere in mostly-Latin text, else only inside mixed-script words."""
    lookalikes = len(_LOOKALIKE_SCRIPTS.findall(text))
    if not lookalikes:
        return text
    if len(_LATIN.findall(text)) >= lookalikes:
        return text.translate(_CONFUSABLES)
    return _WORD.sub(_unconfuse_mixed_word, text)


def _unconfuse_mixed_word(match: re.Match[str]) -> str:
    word = match.group()
    if _LATIN.search(word) and _LOOKALIKE_LETTER.search(word):
        return word.translate(_CONFUSABLES)
    return word


def _read_leet(match: re.Match[str]) -> str:
    token = match.group()
    return token.translate(_LEET) if _LETTER.search(token) else token
