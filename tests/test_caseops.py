"""CaseOps transform (shared/caseops.py): exact round trip, the operator escapes, malformed input named."""
import pytest

from shared import caseops
from shared.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsDecodeError, decode, encode

# (input, expected encoding), written by hand from RECORD_STACK.md §1.2
HAND = [
    ("", ""),
    ("the cat", "the cat"),
    ("Paris", TITLE + "paris"),
    ("I", TITLE + "i"),
    ("NASA", ALLCAPS + "nasa"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("ABc", TITLE + "a" + CAPNEXT + "bc"),
    ("hELLO", "h" + CAPNEXT + "e" + CAPNEXT + "l" + CAPNEXT + "l" + CAPNEXT + "o"),
    ("AAA BB C", ALLCAPS + "aaa " + ALLCAPS + "bb " + TITLE + "c"),
    ("École ÉCOLE", "École É" + ALLCAPS + "cole"),  # É is not ASCII: it ends no run and is never folded
    ("İstanbul ıI", "İstanbul ı" + TITLE + "i"),  # Turkish dotted/dotless I pass through
    ("Ǆ ǅ ǆ", "Ǆ ǅ ǆ"),  # titlecase digraphs: non-ASCII, untouched
    ("x" + TITLE + "Y", "x" + ESC + TITLE + TITLE + "y"),  # a literal operator is escaped
    (ESC, ESC + ESC),
    (ESC + ESC + "A", ESC + ESC + ESC + ESC + TITLE + "a"),
    ("\ue000\ue005\U000f0000", "\ue000\ue005\U000f0000"),  # private-use characters beside the operators: as is
    ("A1B2c3", TITLE + "a1" + TITLE + "b2c3"),  # digits end a run
]


@pytest.mark.parametrize("text,encoded", HAND)
def test_encode_matches_hand_worked_examples_and_decodes_back(text, encoded):
    assert encode(text) == encoded
    assert decode(encoded) == text


def test_round_trip_every_operator_combination():
    alphabet = ["a", "B", " ", "é", "É", TITLE, ALLCAPS, CAPNEXT, ESC, "\ue000"]
    import itertools
    for n in range(1, 5):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            assert decode(encode(text)) == text, repr(text)


def test_round_trip_on_fineweb_edu_sample(reference_data):
    text = (reference_data / "text" / "fineweb_edu_sample_1MB.txt").read_text(encoding="utf-8")
    encoded = encode(text)
    assert decode(encoded) == text
    assert not any(c.isupper() for c in encoded if c.isascii())  # every ASCII capital became an operator
    assert len(encoded) > len(text)  # the sample has capitals


MALFORMED = [
    (TITLE, 0, "TITLE at the end of the text"),
    ("ab" + ALLCAPS, 2, "ALLCAPS at the end of the text"),
    (TITLE + " a", 0, "TITLE not followed by an ASCII letter"),
    (ALLCAPS + "é", 0, "ALLCAPS not followed by an ASCII letter"),
    (CAPNEXT + "a", 0, "CAPNEXT outside a mixed-case word"),
    ("a " + CAPNEXT + "b", 2, "CAPNEXT outside a mixed-case word"),
    (ALLCAPS + "ab" + CAPNEXT + "c", 3, "CAPNEXT outside a mixed-case word"),
    (ESC + "a", 0, "ESC not followed by an operator character"),
    ("x" + ESC, 1, "ESC at the end of the text"),
    (TITLE + ESC + TITLE, 0, "TITLE not followed by an ASCII letter"),
    (TITLE + CAPNEXT + "a", 0, "TITLE not followed by an ASCII letter"),
]


@pytest.mark.parametrize("text,pos,what", MALFORMED)
def test_malformed_operators_are_a_named_one_line_error(text, pos, what):
    with pytest.raises(CaseOpsDecodeError) as err:
        decode(text)
    assert str(err.value) == f"malformed CaseOps text at position {pos}: {what}"
    assert isinstance(err.value, ValueError)


def test_nfkc_letter_before_an_operator_still_decodes():
    # NFKC maps U+00BA to "o": the tokenizer's decode() then shows TITLE right after a letter
    assert decode("450o" + TITLE + "c") == "450oC"


def test_caseops_tokenizer_round_trip_through_sentencepiece(reference_data):
    from shared.tokenizer import load_tokenizer, normalized_text
    sp = load_tokenizer(str(reference_data / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"))
    plain = load_tokenizer(str(reference_data / "tokenizers" / "fineweb_8192_bpe.model"))
    assert caseops.is_caseops_tokenizer(sp) and not caseops.is_caseops_tokenizer(plain)
    text = (reference_data / "text" / "fineweb_edu_sample_1MB.txt").read_text(encoding="utf-8")
    for doc in [d for d in text.splitlines() if d.strip()][:400]:
        ids = sp.encode(encode(doc))
        assert decode(sp.decode(ids)) == normalized_text(plain, doc)
