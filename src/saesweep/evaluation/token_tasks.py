"""Binary token-level tasks labelled automatically from the text, for probe-loss metrics.

Input: windows of token strings (all windows the same length), either as produced by a
HF tokenizer's ``convert_ids_to_tokens`` (byte-level BPE with 'Ġ' = space, 'Ċ' = newline;
SentencePiece with '▁' = space and '<0x0A>' byte tokens) or ``decode`` of single ids
(plain text with real leading spaces). ``token_texts`` maps each token to its plain text;
the window's text is their concatenation. Special tokens ('<|endoftext|>', '<s>', '</s>',
'<pad>', '<unk>', '<bos>', '<eos>', ...) have empty text, get every label False, and act
as a line (and document) boundary.

Character-level rules ("inside" spans) label a token True if at least one of its
non-whitespace characters lies in the span. The text before the window is unknown:
the window start is not a line start and no quote or parenthesis is open there.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

TASKS: dict[str, str] = {
    "leading_space": "the token's text begins with a space and has a non-whitespace character",
    "starts_with_capital": "the first non-whitespace character is an uppercase letter",
    "is_digit": "the text without surrounding whitespace is non-empty and all ASCII digits",
    "is_punctuation": "the stripped text is non-empty and every character is punctuation "
    "(ASCII string.punctuation or Unicode category P*)",
    "end_of_sentence": "the stripped text is exactly '.', '!' or '?'",
    "function_word": "the stripped, lowercased text is in FUNCTION_WORDS and the token is a "
    "whole word (no letter directly before or after it in the window text)",
    "follows_newline": "the previous token's text ends with a newline (or it is a special token)",
    "inside_quotation": "a non-whitespace, non-quote character of the token lies inside double "
    "quotes (\" toggles, “ opens, ” closes; a newline closes any open quote)",
    "inside_parentheses": "a non-whitespace, non-parenthesis character of the token lies "
    "inside ( ) (nesting depth > 0)",
    "speaker_name": "the token overlaps an ALL-CAPS name (≥ 2 letters per word, words separated "
    "by single spaces) at a line start (after optional spaces or tabs) followed directly by "
    "'.' or ':', as in play scripts ('HAMLET.', 'FIRST CITIZEN:')",
}

FUNCTION_WORDS = frozenset(
    """a an the this that these those my your his her its our their
    i me we us you he him she they them it who whom whose which what
    and or but nor so yet if then than because while although though as
    of in on at by for with from to into onto upon about over under between through
    after before during without within against among across up down out off
    is am are was were be been being have has had do does did
    will would shall should can could may might must not no
    there here when where how why all any some each every both either neither""".split()
)

SPECIAL_TOKEN = re.compile(r"^(<\|[^|]*\|>|<s>|</s>|<pad>|<unk>|<bos>|<eos>|<mask>|\[(CLS|SEP|PAD|UNK|MASK)\])$")
BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPEAKER = re.compile(r"[ \t]*([A-Z][A-Z']+(?: [A-Z][A-Z']+)*)(?=[.:])")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the other
    68 bytes to chr(256 + i) in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping


def detect_scheme(tokens: Sequence[str]) -> str:
    """'bytelevel' if any token contains 'Ġ' or 'Ċ', 'sentencepiece' if any contains '▁'
    or is a '<0xNN>' byte token, else 'plain'."""
    if any("Ġ" in t or "Ċ" in t for t in tokens):
        return "bytelevel"
    if any("▁" in t or BYTE_TOKEN.match(t) for t in tokens):
        return "sentencepiece"
    return "plain"


def token_texts(tokens: Sequence[str], scheme: str = "auto") -> tuple[list[str], list[bool]]:
    """(plain text of each token, is-special flags). ``scheme``: 'auto' (``detect_scheme``),
    'bytelevel', 'sentencepiece' or 'plain'. Undecodable bytes become U+FFFD."""
    if scheme == "auto":
        scheme = detect_scheme(tokens)
    if scheme not in ("bytelevel", "sentencepiece", "plain"):
        raise ValueError(f"unknown token scheme {scheme!r}")
    texts, special = [], []
    decoder = _byte_decoder()
    for tok in tokens:
        if SPECIAL_TOKEN.match(tok):
            texts.append("")
            special.append(True)
            continue
        special.append(False)
        if scheme == "bytelevel":
            if all(c in decoder for c in tok):
                texts.append(bytes(decoder[c] for c in tok).decode("utf-8", errors="replace"))
            else:
                texts.append(tok)
        elif scheme == "sentencepiece":
            byte = BYTE_TOKEN.match(tok)
            if byte:
                value = int(byte.group(1), 16)
                texts.append(chr(value) if value < 128 else "\ufffd")
            else:
                texts.append(tok.replace("▁", " "))
        else:
            texts.append(tok)
    return texts, special


def _is_punct(c: str) -> bool:
    return c in string.punctuation or unicodedata.category(c).startswith("P")


def _char_spans(
    texts: Sequence[str], special: Sequence[bool], step: Callable[[str, int], tuple[int, bool]]
) -> list[bool]:
    """Run a per-character state machine over the window text: ``step(char, state) ->
    (new_state, char_is_inside)``; a token is True if any non-whitespace char is inside.
    Special tokens reset the state to 0."""
    state, out = 0, []
    for text, spec in zip(texts, special):
        if spec:
            state = 0
            out.append(False)
            continue
        hit = False
        for c in text:
            state, inside = step(c, state)
            hit |= inside and not c.isspace()
        out.append(hit)
    return out


def _quote_step(c: str, state: int) -> tuple[int, bool]:
    if c == '"':
        return 1 - state, False
    if c == "“":
        return 1, False
    if c == "”":
        return 0, False
    if c == "\n":
        return 0, False
    return state, state == 1


def _paren_step(c: str, state: int) -> tuple[int, bool]:
    if c == "(":
        return state + 1, False
    if c == ")":
        return max(state - 1, 0), False
    return state, state > 0


def _speaker_tokens(texts: Sequence[str], special: Sequence[bool]) -> list[bool]:
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t)
    text = "".join(texts)
    line_starts = {i + 1 for i, c in enumerate(text) if c == "\n"}
    line_starts |= {s for s, spec in zip(starts, special) if spec}
    covered = np.zeros(len(text) + 1, dtype=bool)
    for ls in sorted(line_starts):
        match = SPEAKER.match(text, ls)
        if match:
            covered[match.start(1) : match.end(1)] = True
    return [
        any(covered[s + i] and not c.isspace() for i, c in enumerate(t)) for s, t in zip(starts, texts)
    ]


def label_window(tokens: Sequence[str], scheme: str = "auto") -> dict[str, np.ndarray]:
    """Labels of every task in ``TASKS`` for one window: name -> bool array (len(tokens),)."""
    texts, special = token_texts(tokens, scheme)
    n = len(texts)
    stripped = [t.strip() for t in texts]
    window_text = "".join(texts)
    starts = np.cumsum([0] + [len(t) for t in texts])

    def whole_word(i: int) -> bool:
        s, e = starts[i] + (len(texts[i]) - len(texts[i].lstrip())), starts[i] + len(texts[i].rstrip())
        before = window_text[s - 1] if s > 0 else ""
        after = window_text[e] if e < len(window_text) else ""
        return not before.isalpha() and not after.isalpha()

    labels: dict[str, list[bool]] = {
        "leading_space": [t[:1] == " " and s != "" for t, s in zip(texts, stripped)],
        "starts_with_capital": [s[:1].isupper() for s in stripped],
        "is_digit": [s != "" and all(c in string.digits for c in s) for s in stripped],
        "is_punctuation": [s != "" and all(_is_punct(c) for c in s) for s in stripped],
        "end_of_sentence": [s in (".", "!", "?") for s in stripped],
        "function_word": [s.lower() in FUNCTION_WORDS and whole_word(i) for i, s in enumerate(stripped)],
        "follows_newline": [
            i > 0 and (special[i - 1] or texts[i - 1].endswith("\n")) for i in range(n)
        ],
        "inside_quotation": _char_spans(texts, special, _quote_step),
        "inside_parentheses": _char_spans(texts, special, _paren_step),
        "speaker_name": _speaker_tokens(texts, special),
    }
    return {name: np.array(v, dtype=bool) & ~np.array(special, dtype=bool) for name, v in labels.items()}


def label_tokens(tokens: Sequence[Sequence[str]], scheme: str = "auto") -> dict[str, np.ndarray]:
    """Labels of every task for a batch of windows: name -> bool array (n_windows, ctx).
    All windows must have the same length; the scheme is detected per window if 'auto'."""
    lengths = {len(w) for w in tokens}
    if len(lengths) > 1:
        raise ValueError(f"windows must all have the same length, got lengths {sorted(lengths)}")
    ctx = lengths.pop() if lengths else 0
    out = {name: np.zeros((len(tokens), ctx), dtype=bool) for name in TASKS}
    for row, window in enumerate(tokens):
        for name, value in label_window(window, scheme).items():
            out[name][row] = value
    return out
