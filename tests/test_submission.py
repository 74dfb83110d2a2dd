"""tools.bundle and tools.submission: the bundle carries every shipped module and scores like the repo,
the checks catch bad entries."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script, tiny_env
from shared.runlog import parse_final
from shared.shipped import package_names, shipped_modules
from tools.bundle import bundle_bytes, write_bundle
from shared.runlog import parse_log

SEEDS = (1, 2, 3)

# A miniature repo: a regular subpackage with a relative import, a namespace folder (no __init__.py),
# the top-level modules, and a trainer that imports them all and asks the real shared/shipped.py,
# bundled with them, what ships. No torch: it runs in milliseconds.
FAKE_REPO = {
    "shared/__init__.py": "ROOT_PKG = 'shared'\n",
    "shared/util.py": "def twice(x):\n    return 2 * x\n",
    "shared/quant/__init__.py": "from shared.quant.int8 import BITS\n",
    "shared/quant/int8.py": "from ..util import twice\nBITS = twice(4)\n",
    "shared/ns/leaf.py": "LEAF = 'leaf'\n",
    "torch_model.py": "from shared.quant import BITS\nMODEL = BITS + 1\n",
    "torch_optim.py": "from shared.ns.leaf import LEAF\n",
    "torch_ttt.py": "TTT = 1\n",
    "torch_gptq.py": "GPTQ = 1\n",
    "cuda_train.py": ("import sys\nimport shared.quant, shared.ns.leaf, torch_model, torch_optim\n"
                      "from shared import shipped\n"
                      "if __name__ == '__main__':\n"
                      "    print(torch_model.MODEL, torch_optim.LEAF)\n"
                      "    print(all(sys.modules[m].__dict__.get('__bundled__') for m in\n"
                      "              ('shared', 'shared.util', 'shared.quant', 'shared.quant.int8', 'shared.ns',\n"
                      "               'shared.ns.leaf', 'shared.shipped', 'torch_model', 'torch_optim')))\n"
                      "    files = shipped.code_files(__file__)\n"
                      "    print([f.name for f in files], list(shipped.source_digests(files)))\n"
                      "    print(shipped.repo_root(), shipped.git_commit(shipped.repo_root()))\n"),
}


def _bundled_literals(text: str) -> dict:
    """The bundle's _SOURCES and _PACKAGES, read back without running it."""
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and node.targets[0].id in ("_SOURCES", "_PACKAGES"):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def _without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.parametrize("compress", [False, True])
def test_bundle_serves_subpackages_and_namespace_folders(tmp_path, compress):
    repo = tmp_path / "repo"
    for rel, src in FAKE_REPO.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(src)
    shutil.copy(ROOT / "shared" / "shipped.py", repo / "shared" / "shipped.py")  # the real one, bundled
    data = bundle_bytes(repo / "cuda_train.py", compress=compress, root=repo)
    assert data == bundle_bytes(repo / "cuda_train.py", compress=compress, root=repo)  # deterministic bytes
    if not compress:
        assert _bundled_literals(data.decode())["_PACKAGES"] == ("shared", "shared.ns", "shared.quant")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "train_gpt.py").write_bytes(data)
    res = subprocess.run([sys.executable, "-I", "train_gpt.py"], cwd=alone, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["9 leaf", "True", "['train_gpt.py'] ['train_gpt.py']", "None None"]


def test_bundle_carries_every_shipped_module_and_prints_help_from_an_empty_folder(tmp_path):
    write_bundle(tmp_path / "train_gpt.py")
    found = _bundled_literals((tmp_path / "train_gpt.py").read_text(encoding="utf-8"))
    modules = shipped_modules()
    assert {"shared", "torch_model", "torch_optim"} <= set(modules)
    for name, path in modules.items():
        assert found["_SOURCES"].get(name) == path.read_text(encoding="utf-8"), f"{name}: not in the bundle as {path}"
    assert set(found["_PACKAGES"]) == set(package_names(modules))
    env = _without_pythonpath()
    # Nothing in the repo can serve an import from there: only the venv, which merely lives under ROOT.
    probe = subprocess.run([sys.executable, "-c", "import sys; print('\\n'.join(sys.path))"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True)
    prefix = Path(sys.prefix).resolve()
    for entry in filter(None, probe.stdout.splitlines()):
        p = Path(entry).resolve()
        assert not p.is_relative_to(ROOT) or p.is_relative_to(prefix), f"{entry} on sys.path reaches the repo"
    res = subprocess.run([sys.executable, "train_gpt.py", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("usage: train_gpt.py") and "--eval" in res.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["train_gpt.py"]


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
    cmd = [sys.executable, "-m", "tools.submission", "--logs", *map(str, logs or runs["logs"]),
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
    assert meta["bytes_code"] == (tmp_path / "rec" / "train_gpt.py").stat().st_size == meta["bytes_code_uncompressed"]
    assert meta["bytes_margin"] == 16_000_000 - meta["bytes_total"]
    assert f"({meta['bytes_margin']} under)" in res.stdout.splitlines()[-1]
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
    code = (tmp_path / "rec" / "train_gpt.py").stat().st_size
    assert f"({15_990_000 + code - 16_000_000} over)" in res.stdout


def test_logs_from_other_code_fail(runs, tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=2, RUN_ID="repo")
    run_script([str(ROOT / "cuda_train.py")], env, tmp_path)
    res = submit(runs, tmp_path / "rec", logs=runs["logs"][:2] + [tmp_path / "logs" / "repo.txt"])
    assert res.returncode == 1 and any("logged_source[repo.txt] FAIL" in line for line in _failed(res))
