"""--eval with TTT_ENABLED=1 in both trainers: the no-TTT line, the TTT line with its legality check, the final
lines carrying the TTT score, and both frameworks agreeing on the same artifact (fp32 CPU)."""
import re

import pytest

from conftest import ROOT, run_script, tiny_env
from shared.runlog import parse_final

TTT_ENV = dict(TTT_ENABLED="1", TTT_CHUNK_SIZE="64", TTT_EVAL_SEQ_LEN="64", TTT_BATCH_SIZE="4", TTT_STREAMS="2",
               TTT_LORA_RANK="4", TTT_LORA_ALPHA="8", TTT_LORA_LR="1e-3", PHASED_TTT_PREFIX_DOCS="4",
               PHASED_TTT_NUM_PHASES="1", GLOBAL_TTT_CHUNK_TOKENS="256")
TTT_LINE = re.compile(r"^ttt val_loss:(\S+) val_bpb:(\S+) .* legality:ok$", re.M)
PLAIN_LINE = re.compile(r"^no_ttt val_loss:(\S+) val_bpb:(\S+) ", re.M)


def test_eval_with_ttt_in_both_trainers(tiny_data, tmp_path):
    pytest.importorskip("mlx_model")
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=20)
    plain = parse_final(run_script([str(ROOT / "cuda_train.py")], env, tmp_path).stdout)
    scores = {}
    for trainer in ("cuda_train.py", "mlx_train.py"):
        out = run_script([str(ROOT / trainer), "--eval", env["ARTIFACT_PATH"]], dict(env, **TTT_ENV), tmp_path).stdout
        no_ttt, with_ttt, final = PLAIN_LINE.search(out), TTT_LINE.search(out), parse_final(out)
        assert no_ttt and with_ttt, out[-2000:]
        assert abs(float(no_ttt[2]) - plain["val_bpb"]) < 1e-4  # the artifact's plain score, printed beside
        assert abs(float(with_ttt[2]) - final["val_bpb"]) < 1e-4  # the final lines carry the TTT score
        assert "ttt_phase:1" in out
        scores[trainer] = float(with_ttt[2])
    assert abs(scores["cuda_train.py"] - scores["mlx_train.py"]) < 2e-5, scores  # test_parity_ttt's tolerance


TOKENS_LINE = re.compile(r"^val_tokens:\d+ val_bytes:\d+$", re.M)


@pytest.mark.slow  # CI keeps TTT across ranks in test_parity_ttt.py (two simulated ranks) and both trainers' --eval above
def test_ttt_under_torchrun_two_ranks_equals_one_process(tiny_data, tmp_path):
    """Streams are whole units of work, so 2 gloo ranks score what 1 process scores: without a global phase the
    same sums (the printed 8 digits and token/byte counts equal); with one, the phase's all-reduced gradient sums
    the ranks' halves in another order, so the score agrees to rounding (1e-6 bpb: a few SGD steps of fp32
    rounding on a tiny model; a rank that scores the wrong documents moves it by far more)."""
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=20)
    run_script([str(ROOT / "cuda_train.py")], env, tmp_path)
    for phases in ("0", "1"):
        ttt_env = dict(env, **dict(TTT_ENV, PHASED_TTT_NUM_PHASES=phases))
        args = [str(ROOT / "cuda_train.py"), "--eval", env["ARTIFACT_PATH"]]
        one, two = (run_script(args, ttt_env, tmp_path, torchrun=n).stdout for n in (0, 2))
        a, b = TTT_LINE.search(one), TTT_LINE.search(two)
        assert a and b and TOKENS_LINE.findall(one) == TOKENS_LINE.findall(two) != [], (one[-1500:], two[-1500:])
        if phases == "0":
            assert a.groups() == b.groups()
        else:
            assert "ttt_phase:1" in two and abs(float(a[2]) - float(b[2])) <= 1e-6, (a.groups(), b.groups())
