"""The MLX runtime keeps its streams and compiled graphs: repeated evaluations start no new threads."""
import os

import pytest

pytest.importorskip("mlx_train")

from conftest import tiny_env  # noqa: E402
from shared import bpb  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.spec import init_params  # noqa: E402


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to count threads")
def test_repeated_evaluations_start_no_new_threads(tiny_data, tmp_path):
    import mlx_train
    env = tiny_env(tiny_data, tmp_path, MLX_STREAMS=2, MLX_MAX_MICROBATCH_TOKENS=64)  # several chunks: all streams work
    cfg = Hyperparameters.from_env(env)
    data = bpb.load_eval_data(cfg)
    data.windows = data.windows[:8]
    be = mlx_train.MLXBackend(cfg)
    be.build(cfg, init_params(cfg), train=True)
    first = be.evaluate(data).val_bpb
    before = _threads()
    for _ in range(10):
        assert be.evaluate(data).val_bpb == first
    assert _threads() <= before, f"threads grew from {before} to {_threads()} over 10 evaluations"
