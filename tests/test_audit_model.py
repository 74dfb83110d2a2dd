"""tools/audit_model.py and python -m tools.audit: each model check passes on a correct tiny model (random
weights written as a real artifact, the tiny_record network: SmearGate, document isolation, loops, lanes) and
FAILs when a plausible porting mistake is monkeypatched into the code path the trainers score with."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import cuda_train
import torch_model
from conftest import ROOT, tiny_env
from parity_tests.compare import random_state
from shared import artifact, ttt
from shared.config import Hyperparameters
from tools import audit, audit_data, audit_logs
from tools import audit_model as M
from tools.auditcheck import Finding

# TTT sized for the first validation document of the tiny split (~800 tokens): 13 chunks, one phase cut.
TTT_ENV = dict(TTT_ENABLED="1", TTT_CHUNK_SIZE="64", TTT_EVAL_SEQ_LEN="64", TTT_BATCH_SIZE="4", TTT_STREAMS="1",
               PHASED_TTT_PREFIX_DOCS="1", PHASED_TTT_NUM_PHASES="1", GLOBAL_TTT_CHUNK_TOKENS="256")
WINDOWS, TTT_DOCS = 4, 1


def _artifact(tiny_data, folder, **overrides) -> str:
    cfg = Hyperparameters.from_env(tiny_env(tiny_data, folder, PRESET="tiny_record", **overrides))
    path = str(folder / "audited.bin")
    artifact.save_artifact(path, random_state(cfg), cfg)  # non-trivial weights: the real init hides leaks
    return path


@pytest.fixture(scope="module")
def isolated(tiny_data, tmp_path_factory) -> str:
    """Claims document isolation (tiny_record: DOC_ISOLATED_ATTN=1, SmearGate with its BOS mask), TTT on."""
    return _artifact(tiny_data, tmp_path_factory.mktemp("isolated"), **TTT_ENV)


@pytest.fixture(scope="module")
def dense(tiny_data, tmp_path_factory) -> str:
    return _artifact(tiny_data, tmp_path_factory.mktemp("dense"), DOC_ISOLATED_ATTN="0")


@pytest.fixture(scope="module")
def subject(isolated, tiny_data) -> M.Subject:
    return M.load_subject(isolated, tiny_data["DATA_PATH"], tiny_data["TOKENIZER_PATH"], "torch")


# ---- the porting mistakes ----
def mask_one_ahead(segments):
    """The block-causal mask built with tril(1) instead of tril(0): each query also sees the next key."""
    seqlen = segments.size(1)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=segments.device).tril(1)
    return (segments[:, None, :, None] == segments[:, None, None, :]) & causal


def smear_from_next(e, ids, weight, lam, bos_id):
    """The SmearGate with its shift the wrong way round: e_t mixes e_{t+1} in."""
    e = e.float()
    g = lam * torch.sigmoid((e[..., :weight.size(-1)] * weight[0]).sum(dim=-1, keepdim=True))
    keep = (ids[:, 1:] != bos_id).float()[..., None]
    return torch.cat((e[:, :-1] + g[:, :-1] * keep * e[:, 1:], e[:, -1:]), dim=1)


def smear_without_bos_mask(e, ids, weight, lam, bos_id):
    """The SmearGate before its BOS fix: a document's BOS takes in the previous document's last token."""
    e = e.float()
    g = lam * torch.sigmoid((e[..., :weight.size(-1)] * weight[0]).sum(dim=-1, keepdim=True))
    return torch.cat((e[:, :1], e[:, 1:] + g[:, 1:] * e[:, :-1]), dim=1)


def token_nll_with_target_bonus(self, input_ids, target_ids, segments=None, lora=None):
    """A scorer that boosts the target's logit (a cache or n-gram bonus) but normalises without the boost."""
    logits = self.logits(input_ids, segments, lora)
    target = logits.gather(-1, target_ids[..., None])[..., 0] + 0.05
    return torch.logsumexp(logits, dim=-1) - target


def train_then_score(engine, lora, run, rows, doc_ids, c):
    """TTT that adapts on a chunk, then scores the chunk with the adapted weights."""
    engine.forward(lora, rows.x, rows.y, rows.weights)
    if rows.trains.any():
        engine.update(lora)
        run.ledger.update(c, doc_ids[rows.trains[:doc_ids.size]])
    ttt.add_scores(run, rows, np.asarray(engine.forward(lora, rows.x, rows.y, rows.weights), np.float64), doc_ids, c)


# ---- each check: PASS on the correct model, FAIL with the mistake ----
def test_model_checks_pass_on_a_correct_model(subject):
    found = [M.check_causality(subject, WINDOWS), M.check_doc_isolation(subject, WINDOWS),
             M.check_normalization(subject, WINDOWS), M.check_ttt_order(subject, TTT_DOCS)]
    assert [f.status for f in found] == ["PASS"] * 4, [f.line() for f in found]
    assert "max_abs_logit_diff:0.000e+00" in found[0].figure and "max_abs_logit_diff:0.000e+00" in found[1].figure


@pytest.mark.parametrize("target,fault", [("segment_mask", mask_one_ahead), ("smear", smear_from_next)])
def test_a_leak_from_the_future_fails_causality(subject, monkeypatch, target, fault):
    monkeypatch.setattr(torch_model, target, fault)
    f = M.check_causality(subject, WINDOWS)
    assert f.status == "FAIL" and float(f.figure.split("max_abs_logit_diff:")[1].split()[0]) > 1e-3, f.line()


def test_a_smear_gate_without_its_bos_mask_fails_doc_isolation(subject, monkeypatch):
    monkeypatch.setattr(torch_model, "smear", smear_without_bos_mask)
    assert M.check_doc_isolation(subject, WINDOWS).status == "FAIL"
    assert M.check_causality(subject, WINDOWS).status == "PASS"  # still causal: only isolation is broken


def test_a_scorer_without_segments_fails_doc_isolation(subject, monkeypatch):
    monkeypatch.setattr(cuda_train.TorchBackend, "_segments", lambda self, x: None)  # dense attention at eval
    assert M.check_doc_isolation(subject, WINDOWS).status == "FAIL"


def test_doc_isolation_is_info_when_not_claimed(dense, tiny_data):
    s = M.load_subject(dense, tiny_data["DATA_PATH"], tiny_data["TOKENIZER_PATH"], "torch")
    f = M.check_doc_isolation(s, WINDOWS)
    assert f.status == "INFO" and "DOC_ISOLATED_ATTN=0" in f.figure, f.line()
    assert M.check_ttt_order(s, TTT_DOCS).status == "SKIP"


def test_a_target_bonus_in_the_scorer_fails_normalization(subject, monkeypatch):
    monkeypatch.setattr(torch_model.GPT, "token_nll", token_nll_with_target_bonus)
    f = M.check_normalization(subject, WINDOWS)
    assert f.status == "FAIL" and "max_scorer_nll_diff:5" in f.figure, f.line()  # exactly the 0.05 nats


def test_ttt_that_trains_before_scoring_fails_ttt_order(subject, monkeypatch):
    monkeypatch.setattr(ttt, "score_then_update", train_then_score)
    f = M.check_ttt_order(subject, TTT_DOCS)
    assert f.status == "FAIL" and "doc 0" in f.figure, f.line()


def test_mlx_backend_passes_on_a_correct_model(isolated, tiny_data):
    pytest.importorskip("mlx_model")
    s = M.load_subject(isolated, tiny_data["DATA_PATH"], tiny_data["TOKENIZER_PATH"], "mlx")
    found = [M.check_causality(s, 2), M.check_doc_isolation(s, 2), M.check_normalization(s, 2)]
    assert [f.status for f in found] == ["PASS"] * 3, [f.line() for f in found]


# ---- the command ----
def _stub_other_checks(monkeypatch):
    """The data and log checks are tools/audit_data.py's and tools/audit_logs.py's: here only their lines."""
    monkeypatch.setattr(audit_data, "check_accounting", lambda *a: [Finding("byte_accounting", "PASS", "stub")])
    monkeypatch.setattr(audit_data, "check_no_val_in_train", lambda *a: [Finding("no_val_in_train", "PASS", "stub")])
    monkeypatch.setattr(audit_logs, "check_time_budgets", lambda logs: [Finding("train_time", "SKIP", "stub")])
    monkeypatch.setattr(audit_logs, "check_size", lambda path: [Finding("size", "PASS", "stub")])


def _cli(path, tiny_data, capsys) -> tuple[int, list[str]]:
    rc = audit.main([path, "--data-path", tiny_data["DATA_PATH"], "--tokenizer-path", tiny_data["TOKENIZER_PATH"],
                     "--windows", "2", "--max-docs", str(TTT_DOCS)])
    return rc, capsys.readouterr().out.splitlines()


def test_cli_prints_one_line_per_check_and_exits_1_on_a_fail(dense, tiny_data, monkeypatch, capsys):
    _stub_other_checks(monkeypatch)
    rc, lines = _cli(dense, tiny_data, capsys)
    names = [line.split()[0] for line in lines]
    assert rc == 0 and names == ["audit:causality", "audit:doc_isolation", "audit:normalization",
                                 "audit:byte_accounting", "audit:no_val_in_train", "audit:ttt_order",
                                 "audit:train_time", "audit:size"], lines
    monkeypatch.setattr(torch_model.GPT, "token_nll", token_nll_with_target_bonus)
    rc, lines = _cli(dense, tiny_data, capsys)
    assert rc == 1 and len(lines) == 8 and lines[2].startswith("audit:normalization FAIL"), lines


def test_cli_bad_artifact_is_one_line_and_exit_2(tmp_path, tiny_data):
    res = subprocess.run([sys.executable, "-m", "tools.audit", str(tmp_path / "missing.bin"), "--data-path",
                          tiny_data["DATA_PATH"], "--tokenizer-path", tiny_data["TOKENIZER_PATH"]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "missing.bin" in res.stderr, res.stderr


def _log(path, seed: int, shipped: str) -> str:
    """A finished run's log as shared/runlog.py writes it (the shipped source, then key:value lines)."""
    path.write_text(shipped + "\n" + "=" * 100 + "\n" + "\n".join([
        f'config:{{"seed": {seed}}}', "backend:torch-test device:cpu", "step:6/6 train_loss:3.0 train_time:1000ms",
        "val_tokens:1000 val_bytes:4000", "artifact:a artifact_bytes:100 code_bytes:100",
        f"final_roundtrip_exact val_loss:3.0000000{seed} val_bpb:1.2000000{seed} eval_time:1000ms"]) + "\n")
    return str(path)


def test_submission_runs_the_audit_and_fails_on_an_audit_fail(dense, tiny_data, tmp_path, monkeypatch, capsys):
    from tools import submission
    from tools.bundle import bundle_source
    _stub_other_checks(monkeypatch)
    logs = [_log(tmp_path / f"seed{s}.txt", s, bundle_source(compress=False)) for s in (1, 2, 3)]

    def submit(out: str) -> tuple[int, str, str]:
        rc = submission.main(["--logs", *logs, "--artifact", dense, "--name", "t", "--author", "a", "--github-id",
                              "a", "--out", str(tmp_path / out), "--audit-data-path", tiny_data["DATA_PATH"],
                              "--audit-tokenizer-path", tiny_data["TOKENIZER_PATH"]])
        return rc, capsys.readouterr().out, (tmp_path / out / "README.md").read_text()
    rc, printed, readme = submit("good")
    assert rc == 0 and "audit:causality PASS" in printed and "- `audit:causality PASS" in readme, printed
    assert readme.count("`audit:") == 8 and "## Compliance audit" in readme
    monkeypatch.setattr(torch_model.GPT, "token_nll", token_nll_with_target_bonus)
    rc, printed, readme = submit("bad")
    assert rc == 1 and "audit:normalization FAIL" in printed and "`audit:normalization FAIL" in readme, printed
