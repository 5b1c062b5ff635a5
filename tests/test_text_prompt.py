"""A1111 prompt weighting and 75-token windows."""

import pytest
import torch

from sumie.text.clip_tokenizer import BOS, EOS, ClipTokenizer, bytes_to_unicode
from sumie.text.prompt import BREAK, apply_weights, batch_windows, parse_prompt_weights, tokenize_weighted


@pytest.mark.parametrize("prompt, expected", [
    # the examples in the docstring of A1111's parse_prompt_attention (modules/prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_a1111_documented_examples(prompt, expected):
    assert parse_prompt_weights(prompt) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("", [("", 1.0)]),
    ("[dim]", [("dim", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+.5)", [("a", 0.5)]),
    ("a) b] c", [("a) b] c", 1.0)]),  # closers without openers are literal
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight without an open bracket is literal
    ("x (a:1.2.3) y", [("x ", 1.0), ("a:1.2.3) y", 1.1)]),  # A1111 raises here; literal, bracket stays open
    ("(a [b) c]", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1 / 1.1)]),
    ("a \\\\ b \\x", [("a \\ b x", 1.0)]),  # escaped backslash; a lone backslash is dropped
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("(東京:1.2) и ру́сский 🐱", [("東京", 1.2), (" и ру́сский 🐱", 1.0)]),
])
def test_edge_cases(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_break():
    assert parse_prompt_weights("a BREAK b") == [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]
    assert parse_prompt_weights("(x BREAK y)") == [("x", 1.1), (BREAK, -1.0), ("y", 1.1)]
    assert parse_prompt_weights("BREAKFAST break") == [("BREAKFAST break", 1.0)]
    # a negative weight next to a break never merges with it
    assert parse_prompt_weights("(a:-1) BREAK") == [("a", -1.0), ("", 1.0), (BREAK, -1.0), ("", 1.0)]


@pytest.fixture(scope="module")
def word_tokenizer():
    """Byte symbols plus a handful of whole words, enough to count tokens exactly."""
    syms = list(bytes_to_unicode().values())
    words = ["cat", "dog", "red"]
    merges, vocab_tokens = [], syms + [s + "</w>" for s in syms]
    for w in words:
        acc = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if i == len(w) - 1 else "")
            merges.append((acc, nxt))
            acc += nxt
            vocab_tokens.append(acc)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_tokens + [BOS, EOS]))}
    return ClipTokenizer(vocab, merges)


def test_windows_of_75(word_tokenizer):
    t = word_tokenizer
    cat = t.encode_text("cat")[0]
    w = tokenize_weighted(t, " ".join(["cat"] * 100))
    assert w.ids.shape == (2, 77) and w.token_count == 100
    assert w.ids[0, 0] == t.bos_token_id and w.ids[0, 76] == t.eos_token_id
    assert (w.ids[0, 1:76] == cat).all()
    assert (w.ids[1, 1:26] == cat).all() and w.ids[1, 26] == t.eos_token_id
    assert (w.ids[1, 27:] == t.pad_token_id).all()
    assert tokenize_weighted(t, " ".join(["cat"] * 75)).ids.shape == (1, 77)


def test_weights_follow_tokens(word_tokenizer):
    w = tokenize_weighted(word_tokenizer, "red (cat:1.5) [dog]")
    assert w.weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert (w.weights[0, 5:] == 1).all()
    plain = tokenize_weighted(word_tokenizer, "red (cat:1.5) [dog]", weighting=False)
    assert plain.token_count == 11  # brackets, colon and digits are tokens when weighting is off


def test_break_and_empty_prompt(word_tokenizer):
    t = word_tokenizer
    w = tokenize_weighted(t, "cat BREAK dog")
    assert w.ids.shape == (2, 77)
    assert w.ids[0, :3].tolist() == [t.bos_token_id, t.encode_text("cat")[0], t.eos_token_id]
    e = tokenize_weighted(t, "")
    assert e.ids.shape == (1, 77) and e.ids[0, :2].tolist() == [t.bos_token_id, t.eos_token_id]
    z = tokenize_weighted(t.with_padding(False), "")
    assert (z.ids[0, 2:] == 0).all()


def test_comma_backtrack(word_tokenizer):
    """Filling a window just after a comma moves the words after it to the next window."""
    t = word_tokenizer
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    w = tokenize_weighted(t, prompt)
    comma = t.vocab[",</w>"]
    assert w.ids[0, 71] == comma and w.ids[0, 72] == t.eos_token_id
    assert (w.ids[1, 1:11] == t.encode_text("dog")[0]).all()
    w0 = tokenize_weighted(t, prompt, comma_backtrack=0)
    assert w0.ids[0, 75] == t.encode_text("dog")[0]


def test_batch_pads_with_empty_windows(word_tokenizer):
    ids, weights = batch_windows(word_tokenizer, ["cat " * 80, "dog"])
    assert ids.shape == weights.shape == (2, 2, 77)
    assert ids[1, 1, :2].tolist() == [word_tokenizer.bos_token_id, word_tokenizer.eos_token_id]


def test_apply_weights_keeps_the_mean():
    torch.manual_seed(0)
    z = torch.randn(2, 77, 16) + 0.3
    w = torch.ones(2, 77)
    assert apply_weights(z, w) is z
    w[0, 3:6] = 1.4
    w[1, 10] = 0.5
    out = apply_weights(z, w)
    assert torch.allclose(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), atol=1e-6)
    ratio = (out[0, 4] / z[0, 4]) / (out[0, 20] / z[0, 20])
    assert torch.allclose(ratio, torch.full_like(ratio, 1.4), atol=1e-4)


def test_text_encoder_output_contract():
    from sumie.text.base import TextEncoderOutput

    out = TextEncoderOutput(torch.zeros(2, 77, 8), torch.zeros(2, 4), torch.ones(2, 77, dtype=torch.long))
    assert set(out.as_cond()) == {"context", "context_mask"}
    assert out.to(dtype=torch.float16).hidden.dtype == torch.float16
    with pytest.raises(ValueError, match="inconsistent"):
        TextEncoderOutput(torch.zeros(2, 77, 8), torch.zeros(3, 4), torch.ones(2, 77))
    with pytest.raises(ValueError, match="inconsistent"):
        TextEncoderOutput(torch.zeros(2, 77, 8), torch.zeros(2, 4), torch.ones(2, 76))
