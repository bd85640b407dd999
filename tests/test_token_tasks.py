import numpy as np
import pytest

from saesweep.evaluation.token_tasks import FUNCTION_WORDS, TASKS, detect_scheme, label_tokens, label_window, token_texts


def on(labels, name):
    """Positions where the task is True."""
    return np.flatnonzero(labels[name]).tolist()


# "HAMLET. The (rest) is 42!\n" said "I"...
PLAIN = ["HAM", "LET", ".", " The", " (", "rest", ")", " is", " 42", "!\n", '"', "Hi", " there", '."', " the", "atre"]
BYTELEVEL = [t.replace(" ", "Ġ").replace("\n", "Ċ") for t in PLAIN]
SENTENCEPIECE = [t.replace(" ", "▁").replace("\n", "") for t in PLAIN]
SENTENCEPIECE[9:10] = ["!", "<0x0A>"]
SENTENCEPIECE = SENTENCEPIECE[:-1]  # keep the length: 16 tokens


def test_schemes_decode_to_the_same_text():
    assert detect_scheme(PLAIN) == "plain"
    assert detect_scheme(BYTELEVEL) == "bytelevel"
    assert detect_scheme(SENTENCEPIECE) == "sentencepiece"
    assert token_texts(BYTELEVEL)[0] == PLAIN
    assert "".join(token_texts(SENTENCEPIECE)[0]) == "".join(PLAIN[:-1])
    # byte-level multi-byte characters: “ is E2 80 9C, shown as 'âĢľ'
    assert token_texts(["ĠâĢľ", "Hi"], "bytelevel")[0] == [" “", "Hi"]


@pytest.mark.parametrize("window", [PLAIN, BYTELEVEL])
def test_rules_on_a_hand_written_window(window):
    labels = label_window(window)
    assert set(labels) == set(TASKS)
    assert all(v.shape == (16,) and v.dtype == bool for v in labels.values())
    assert on(labels, "leading_space") == [3, 4, 7, 8, 12, 14]
    assert on(labels, "starts_with_capital") == [0, 1, 3, 11]
    assert on(labels, "is_digit") == [8]
    assert on(labels, "is_punctuation") == [2, 4, 6, 9, 10, 13]
    assert on(labels, "end_of_sentence") == [2, 9]
    assert on(labels, "function_word") == [3, 7, 12]  # " the" + "atre" is not a whole word
    assert on(labels, "follows_newline") == [10]
    assert on(labels, "inside_quotation") == [11, 12, 13]  # '."' has the '.' inside
    assert on(labels, "inside_parentheses") == [5]
    assert on(labels, "speaker_name") == []  # the window start is not a line start


def test_speaker_names_in_a_play():
    window = ["<|endoftext|>", "HAM", "LET", ".", " To", " be", "\n", "FIRST", " CIT", "IZEN", ":", " Nay",
              "\n", "I", ".", " A", " NOTE", ":"]
    labels = label_window(window)
    assert on(labels, "speaker_name") == [1, 2, 7, 8, 9]  # 'I.' is one letter, ' NOTE' not at line start
    assert on(labels, "follows_newline") == [1, 7, 13]  # a special token is a boundary
    assert not any(v[0] for v in labels.values())  # special tokens are False everywhere


def test_quotes_close_at_newline_and_curly_quotes():
    window = ['"', "open", "\n", "out", " “", "in", "”", " out"]
    assert on(label_window(window), "inside_quotation") == [1, 5]


def test_label_tokens_batches_windows():
    windows = [PLAIN, BYTELEVEL, ["a"] * 16]
    labels = label_tokens(windows)
    assert labels["is_digit"].shape == (3, 16)
    assert (labels["end_of_sentence"][0] == labels["end_of_sentence"][1]).all()
    assert not labels["function_word"][2].any()  # 'aaaa…' is one long word
    assert "the" in FUNCTION_WORDS and "a" in FUNCTION_WORDS
    with pytest.raises(ValueError):
        label_tokens([PLAIN, PLAIN[:3]])
