"""--variant sp8192 / sp8192_caseops, offline: only the network layer (huggingface_hub) is replaced, by a fake
hub serving files from a folder per repo; planning, download, verification and manifests are our real code."""
import json
import shutil

import pytest

from data import download, prepare
from data.build import build_dataset
from shared import bpb, caseops
from shared.config import preset
from shared.data import load_shard, write_shard
from shared.manifest import check_tokenizer, read_manifest

CASEOPS_TOK = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"


def _docs():
    from pydoc_data.topics import topics  # real prose that ships with Python, loaded in milliseconds
    return [topics[k] for k in sorted(topics)[:40]]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """A plain and a CaseOps dataset built locally: the files the fake repos will serve."""
    root = tmp_path_factory.mktemp("builds")
    build_dataset(_docs(), "plain", root, val_docs=4, tokenizer=None, vocab_size=384, shard_tokens=20_000)
    build_dataset(_docs(), "cops", root, val_docs=4, tokenizer=None, vocab_size=384, shard_tokens=20_000,
                  caseops_transform=True)
    return root


def _publish(remote, repo, dataset_dir, src, tok_name, listed=True):
    """Lay src out as a published repo: datasets/datasets/<dir>/, datasets/tokenizers/, datasets/manifest.json."""
    base = remote / repo / "datasets"
    shutil.copytree(src, base / "datasets" / dataset_dir)
    (base / "datasets" / dataset_dir / "manifest.json").unlink()  # ours, not part of a published export
    (base / "tokenizers").mkdir(parents=True, exist_ok=True)
    shutil.copy(src.parents[1] / "tokenizers" / f"{src.name}.model", base / "tokenizers" / f"{tok_name}.model")
    n = lambda pat: len(list((base / "datasets" / dataset_dir).glob(pat)))  # noqa: E731
    entry = {"name": dataset_dir, "tokenizer_name": tok_name,
             "stats": {"files_train": n("fineweb_train_*.bin"), "files_val": n("fineweb_val_[0-9]*.bin")}}
    manifest = {"datasets": [entry] if listed else [],
                "tokenizers": [{"name": tok_name, "model_path": f"tokenizers/{tok_name}.model"}]}
    (base / "manifest.json").write_text(json.dumps(manifest))


class FakeHub:
    """hf_hub_download / HfApi over remote/<owner>/<name>/...; records which repo each file came from."""

    def __init__(self, remote):
        self.remote, self.calls = remote, []

    def hf_hub_download(self, repo_id, filename, subfolder=None, repo_type=None, **_):
        assert repo_type == "dataset"
        path = self.remote / repo_id / (subfolder or "") / filename
        self.calls.append((repo_id, f"{subfolder}/{filename}"))
        if not path.is_file():
            raise FileNotFoundError(f"404 {repo_id}/{subfolder}/{filename}")
        return str(path)

    def HfApi(self):  # noqa: N802 (the library's name)
        raise ConnectionError("offline")  # sizes unknown: verification falls back to the shard headers


@pytest.fixture
def hub(tmp_path, monkeypatch, builds):
    hf = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    remote = tmp_path / "remote"
    _publish(remote, "kevclark/parameter-golf", "fineweb10B_sp8192", builds / "datasets" / "plain",
             "fineweb_8192_bpe")
    _publish(remote, "romeerp/parameter-golf-caseops-v1", download.CASEOPS_DIR, builds / "datasets" / "cops",
             CASEOPS_TOK)
    fake = FakeHub(remote)
    monkeypatch.setattr(hf, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(hf, "HfApi", fake.HfApi)
    return fake


def test_sp8192_comes_from_its_repo_and_a_stale_local_manifest_does_not_hide_it(hub, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # what the official downloader left behind: the official repo's manifest, which lists no sp8192
    (out / "manifest.json").write_text(json.dumps({"datasets": [{"name": "fineweb10B_sp1024"}], "tokenizers": []}))
    assert prepare.main(["--variant", "sp8192", "--train-shards", "1", "--out", str(out)]) == 0
    assert {repo for repo, _ in hub.calls} == {"kevclark/parameter-golf"}
    ds = out / "datasets" / "fineweb10B_sp8192"
    assert sorted(p.name for p in ds.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert check_tokenizer(str(ds), str(out / "tokenizers" / "fineweb_8192_bpe.model"))[1] == "verified"
    assert read_manifest(ds)["transform"] is None


def test_the_environment_repo_wins_over_the_variant_repo(hub, tmp_path, monkeypatch, builds):
    _publish(hub.remote, "me/mirror", "fineweb10B_sp8192", builds / "datasets" / "plain", "fineweb_8192_bpe")
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "me/mirror")
    assert prepare.main(["--variant", "sp8192", "--train-shards", "0", "--out", str(tmp_path / "out")]) == 0
    assert {repo for repo, _ in hub.calls} == {"me/mirror"}


def test_sp8192_caseops_download_is_what_the_record_preset_reads(hub, tmp_path, monkeypatch):
    out = tmp_path / "data"
    assert prepare.main(["--variant", "sp8192_caseops", "--train-shards", "1", "--out", str(out)]) == 0
    assert {repo for repo, _ in hub.calls} == {"romeerp/parameter-golf-caseops-v1"}
    ds = out / "datasets" / download.CASEOPS_DIR
    assert (ds / "fineweb_val_bytes_000000.bin").is_file()
    assert read_manifest(ds)["transform"] == caseops.TRANSFORM
    rec = preset("record")  # its paths are relative to the repo root, where data/ lives
    monkeypatch.chdir(tmp_path)
    assert (tmp_path / rec.data_path).resolve() == ds.resolve()
    assert (tmp_path / rec.tokenizer_path).is_file()
    import dataclasses
    cfg = dataclasses.replace(rec, vocab_size=384, train_seq_len=64, eval_stride=0)
    data = bpb.load_eval_data(cfg)
    assert data.byte_source == "sidecar"
    assert int(data.target_bytes.sum()) == int(load_shard(ds / "fineweb_val_bytes_000000.bin")[1:].sum())


def test_a_remote_sidecar_of_the_wrong_length_fails_the_download(hub, tmp_path, capsys):
    side = hub.remote / "romeerp/parameter-golf-caseops-v1/datasets/datasets" / download.CASEOPS_DIR / \
        "fineweb_val_bytes_000000.bin"
    write_shard(side, load_shard(side)[:-3])
    assert prepare.main(["--variant", "sp8192_caseops", "--train-shards", "0", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "fineweb_val_bytes_000000.bin: the byte sidecar counts" in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "datasets" / download.CASEOPS_DIR / "manifest.json").exists()


def test_a_variant_missing_from_the_remote_manifest_names_what_it_lists(hub, tmp_path, capsys, builds):
    shutil.rmtree(hub.remote / "kevclark")
    _publish(hub.remote, "kevclark/parameter-golf", "fineweb10B_sp8192", builds / "datasets" / "plain",
             "fineweb_8192_bpe", listed=False)
    assert prepare.main(["--variant", "sp8192", "--out", str(tmp_path / "o")]) == 1
    assert "manifest has no dataset 'fineweb10B_sp8192' (variant sp8192); it lists []" in capsys.readouterr().err


def test_plans_offline():
    manifest = {"datasets": [{"name": download.CASEOPS_DIR, "tokenizer_name": "t",
                              "stats": {"files_train": 3, "files_val": 2}}], "tokenizers": []}
    files = download.plan_files(manifest, "sp8192_caseops", 1, "datasets")
    base = f"datasets/datasets/{download.CASEOPS_DIR}"
    assert files == [f"{base}/fineweb_val_000000.bin", f"{base}/fineweb_val_000001.bin",
                     f"{base}/fineweb_val_bytes_000000.bin", f"{base}/fineweb_val_bytes_000001.bin",
                     f"{base}/fineweb_train_000000.bin", f"datasets/tokenizers/{CASEOPS_TOK}.model"]
    assert download.plan_files(manifest, "sp8192_lossless_caps_caseops_v1_reserved", 0, "datasets")[:4] == files[:4]
    assert download.repo_settings("sp8192") == ("kevclark/parameter-golf", "datasets")
    assert download.repo_settings("sp1024") == ("willdepueoai/parameter-golf", "datasets")
    with pytest.raises(ValueError, match="sp8192_caseops"):
        download.dataset_dir_for_variant("caseops")
