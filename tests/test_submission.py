"""shared.bundle and shared.submission: the bundle scores like the repo, the checks catch bad entries."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, tiny_env
from shared.bundle import write_bundle
from shared.runlog import parse_final
from shared.submission import parse_log

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Three seeds trained by the bundled train_gpt.py itself, from its own folder."""
    work = tmp_path_factory.mktemp("records_work")
    bundle = work / "train_gpt.py"
    write_bundle(bundle)
    logs = []
    for seed in SEEDS:
        env = tiny_env(tiny_data, work, ITERATIONS=6, SEED=seed, RUN_ID=f"seed{seed}",
                       ARTIFACT_PATH=str(work / f"seed{seed}.int8.zst"))
        run_script(["-I", str(bundle)], env, work)
        logs.append(work / "logs" / f"seed{seed}.txt")
    return {"work": work, "logs": logs, "env": env, "bundle": bundle}


def submit(runs, out, *extra, logs=None):
    cmd = [sys.executable, "-m", "shared.submission", "--logs", *map(str, logs or runs["logs"]),
           "--artifact", str(runs["work"] / "seed3.int8.zst"), "--name", "Tiny test", "--author", "A. Person",
           "--github-id", "aperson", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_bundle_runs_alone_and_scores_like_the_repo_trainer(runs, tmp_path):
    artifact = str(runs["work"] / "seed3.int8.zst")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(runs["bundle"], alone / "train_gpt.py")
    # -I: no PYTHONPATH, no script dir, no cwd on sys.path: only the bundle's own sources can serve `shared`
    bundled = run_script(["-I", str(alone / "train_gpt.py"), "--eval", artifact], runs["env"], alone).stdout
    repo = run_script([str(ROOT / "cuda_train.py"), "--eval", artifact], runs["env"], tmp_path).stdout
    assert parse_final(bundled) == parse_final(repo)
    assert f"code_bytes:{(alone / 'train_gpt.py').stat().st_size}" in bundled


def test_compressed_bundle_scores_the_same(runs, tmp_path):
    small = tmp_path / "train_gpt.py"
    n = write_bundle(small, compress=True)
    assert n < runs["bundle"].stat().st_size / 2
    artifact = str(runs["work"] / "seed3.int8.zst")
    out = run_script(["-I", str(small), "--eval", artifact], runs["env"], tmp_path).stdout
    ref = run_script(["-I", str(runs["bundle"]), "--eval", artifact], runs["env"], tmp_path).stdout
    assert parse_final(out) == parse_final(ref)


def test_good_entry_passes_and_json_carries_the_log_values(runs, tmp_path):
    parsed = [parse_log(p) for p in runs["logs"]]
    sota = max(r.val_bpb for r in parsed) + 0.5
    res = submit(runs, tmp_path / "rec", "--sota", str(sota), "--summary", "tiny")
    assert res.returncode == 0, res.stdout + res.stderr
    meta = json.loads((tmp_path / "rec" / "submission.json").read_text())
    assert meta["seeds"] == list(SEEDS)
    for r in parsed:
        got = meta["seed_results"][str(r.seed)]
        assert (got["val_bpb"], got["val_loss"], got["artifact_bytes"]) == (r.val_bpb, r.val_loss, r.artifact_bytes)
    assert meta["val_bpb"] == pytest.approx(sum(r.val_bpb for r in parsed) / 3, abs=1e-12)
    assert meta["bytes_code"] == (tmp_path / "rec" / "train_gpt.py").stat().st_size
    assert meta["compliance"]["significant"] is True and meta["pytorch_version"]
    assert (tmp_path / "rec" / "README.md").exists() and (tmp_path / "rec" / "seed1.txt").exists()
    assert "check:improvement_nats_per_byte PASS" in res.stdout


def _failed(res) -> list[str]:
    return [line for line in res.stdout.splitlines() if " FAIL " in line]


def test_missing_seeds_fail(runs, tmp_path):
    res = submit(runs, tmp_path / "rec", logs=runs["logs"][:2])
    assert res.returncode == 1 and any(line.startswith("check:seeds FAIL") for line in _failed(res))


def test_no_improvement_fails_the_t_test(runs, tmp_path):
    mean = sum(parse_log(p).val_bpb for p in runs["logs"]) / 3
    res = submit(runs, tmp_path / "rec", "--sota", str(mean))
    assert res.returncode == 1 and any("improvement_nats_per_token FAIL" in line for line in _failed(res))


def test_log_past_600s_fails(runs, tmp_path):
    slow = tmp_path / "seed2.txt"
    slow.write_text(runs["logs"][1].read_text() + "step:6/6 train_loss:1.0 train_time:700000ms step_avg:1.0ms\n")
    res = submit(runs, tmp_path / "rec", logs=[runs["logs"][0], slow, runs["logs"][2]])
    assert res.returncode == 1 and any(line.startswith("check:train_time[seed2.txt] FAIL") for line in _failed(res))


def test_over_cap_artifact_fails(runs, tmp_path):
    with open(tmp_path / "seed3.int8.zst", "wb") as f:
        f.truncate(15_990_000)  # + the ~78 KB bundle is over 16,000,000
    res = submit(dict(runs, work=tmp_path), tmp_path / "rec")
    assert res.returncode == 1 and any(line.startswith("check:bytes[artifact] FAIL") for line in _failed(res))


def test_logs_from_other_code_fail(runs, tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=2, RUN_ID="repo")
    run_script([str(ROOT / "cuda_train.py")], env, tmp_path)
    res = submit(runs, tmp_path / "rec", logs=runs["logs"][:2] + [tmp_path / "logs" / "repo.txt"])
    assert res.returncode == 1 and any("logged_source[repo.txt] FAIL" in line for line in _failed(res))
