import numpy as np
import pytest

from shared.data import (HEADER_BYTES, TokenLoader, TokenStream, list_shards, load_shard, read_shard_header,
                         write_shard)


def test_round_trip_and_exact_layout(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 7], dtype=np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * tokens.size
    assert np.frombuffer(raw[:12], "<i4").tolist() == [20240520, 1, 5]
    np.testing.assert_array_equal(load_shard(path), tokens)
    assert not list(tmp_path.glob("*.tmp"))


def _bad_header(path, magic=20240520, version=1, count=3, n_tokens=3):
    header = np.zeros(256, "<i4")
    header[:3] = (magic, version, count)
    path.write_bytes(header.tobytes() + np.arange(n_tokens, dtype="<u2").tobytes())
    return path


@pytest.mark.parametrize("kwargs,match", [
    (dict(magic=1234), "magic"),
    (dict(version=2), "version"),
    (dict(count=5), "header says 5 tokens"),
    (dict(count=3, n_tokens=4), "header says 3 tokens"),
])
def test_bad_headers_name_the_file(tmp_path, kwargs, match):
    path = _bad_header(tmp_path / "fineweb_val_000000.bin", **kwargs)
    with pytest.raises(ValueError, match=match) as info:
        read_shard_header(path)
    assert str(path) in str(info.value)


def test_short_file_and_token_out_of_vocab(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="shorter than"):
        load_shard(short)
    path = tmp_path / "v.bin"
    write_shard(path, np.array([1, 2, 300], dtype=np.uint16))
    with pytest.raises(ValueError, match="VOCAB_SIZE=256"):
        load_shard(path, vocab_size=256)


def test_empty_glob_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        list_shards(str(tmp_path / "fineweb_train_*.bin"))


def _write_stream(tmp_path, n=5000, shards=3):
    tokens = (np.arange(n) % 60000).astype(np.uint16)
    for i, part in enumerate(np.array_split(tokens, shards)):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", part)
    return str(tmp_path / "fineweb_train_*.bin"), tokens


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_world_size_sees_the_same_slots(tmp_path, world_size):
    """Slot k*W + r of a step is the same tokens for any world size W (and wraps across shards)."""
    pattern, tokens = _write_stream(tmp_path)
    global_tokens, seq = 256, 8
    reference = TokenLoader(pattern, 0, 1)
    loaders = [TokenLoader(pattern, r, world_size) for r in range(world_size)]
    for _ in range(6):  # 6 steps * (256+8) tokens crosses shard boundaries and wraps
        ref_slots = [reference.next_micro_batch(global_tokens, seq) for _ in range(8)]
        for k in range(8 // world_size):
            for r, loader in enumerate(loaders):
                x, y = loader.next_micro_batch(global_tokens, seq)
                rx, ry = ref_slots[k * world_size + r]
                np.testing.assert_array_equal(x, rx)
                np.testing.assert_array_equal(y, ry)


def test_schedule_matches_the_official_formula(tmp_path):
    pattern, tokens = _write_stream(tmp_path)
    loader = TokenLoader(pattern, 1, 2)
    x, y = loader.next_micro_batch(256, 8)
    span = 256 // 8 + 1
    np.testing.assert_array_equal(x.ravel(), tokens[span:2 * span - 1])
    np.testing.assert_array_equal(y.ravel(), tokens[span + 1:2 * span])
    assert x.shape == (4, 8)


def test_stream_state_restores_position(tmp_path):
    pattern, _ = _write_stream(tmp_path)
    a = TokenLoader(pattern)
    for _ in range(20):
        a.next_micro_batch(256, 8)
    b = TokenLoader(pattern)
    b.stream.restore(a.stream.state())
    np.testing.assert_array_equal(a.next_micro_batch(256, 8)[0], b.next_micro_batch(256, 8)[0])


def test_world_size_must_divide_8(tmp_path):
    pattern, _ = _write_stream(tmp_path)
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        TokenLoader(pattern, 0, 3)


def test_train_shards_of_zero_tokens_are_refused_at_open(tmp_path):
    for i in range(2):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.array([], dtype=np.uint16))
    with pytest.raises(ValueError, match="0 tokens"):
        TokenStream(str(tmp_path / "fineweb_train_*.bin"))  # used to spin forever in take()


def test_an_empty_shard_among_full_ones_is_skipped(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.array([1, 2, 3], dtype=np.uint16))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.array([], dtype=np.uint16))
    write_shard(tmp_path / "fineweb_train_000002.bin", np.array([4, 5], dtype=np.uint16))
    stream = TokenStream(str(tmp_path / "fineweb_train_*.bin"))
    assert stream.take(7).tolist() == [1, 2, 3, 4, 5, 1, 2]  # wraps past the empty one


@pytest.mark.parametrize("kwargs,match", [(dict(magic=1234), "magic"), (dict(count=9), "header says 9 tokens")])
def test_a_corrupt_later_shard_fails_at_open_by_name(tmp_path, kwargs, match):
    pattern, _ = _write_stream(tmp_path)
    bad = _bad_header(tmp_path / "fineweb_train_000001.bin", **kwargs)  # replaces the second of three shards
    with pytest.raises(ValueError, match=match) as info:
        TokenStream(pattern)  # before any token of the first shard is read
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("state", [{"file_idx": 3, "pos": 0}, {"file_idx": -1, "pos": 0},
                                   {"file_idx": 0, "pos": 1668}, {"file_idx": 2, "pos": -1},
                                   {"file_idx": 0}, {"file_idx": "x", "pos": 0}])
def test_restore_refuses_a_position_outside_the_shards(tmp_path, state):
    pattern, _ = _write_stream(tmp_path)  # 5000 tokens in 3 shards: 1667, 1667, 1666
    stream = TokenStream(pattern)
    with pytest.raises(ValueError, match="file_idx"):
        stream.restore(state)


def test_restore_at_the_end_of_a_shard_continues_in_the_next(tmp_path):
    pattern, tokens = _write_stream(tmp_path)
    stream = TokenStream(pattern)
    stream.restore({"file_idx": 0, "pos": 1667})
    np.testing.assert_array_equal(stream.take(5), tokens[1667:1672])
    stream.restore({"file_idx": 2, "pos": 1665})
    np.testing.assert_array_equal(stream.take(3), np.concatenate([tokens[4999:], tokens[:2]]))  # wraps


def test_fingerprint_lists_every_shard_and_its_count(tmp_path):
    pattern, _ = _write_stream(tmp_path)
    assert TokenStream(pattern).fingerprint() == [["fineweb_train_000000.bin", 1667],
                                                  ["fineweb_train_000001.bin", 1667],
                                                  ["fineweb_train_000002.bin", 1666]]
