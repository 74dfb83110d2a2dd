"""TOKENIZER_PATH errors say what is wrong with the path."""
import pytest

from shared.tokenizer import load_tokenizer


def test_a_folder_is_reported_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"TOKENIZER_PATH=.* is a directory, not a SentencePiece \.model file"):
        load_tokenizer(str(tmp_path))


def test_a_missing_file_and_a_garbage_file_are_told_apart(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "absent.model"))
    (tmp_path / "junk.model").write_bytes(b"\xff not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
