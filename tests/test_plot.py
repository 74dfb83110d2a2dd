"""tools/plot.py: both trainers' logs plot into one PNG of the expected size and one table row each."""
import numpy as np
import pytest

from tests.test_audit_logs import write_log
from tools.plot import DPI, FIGSIZE, main, parse_run

matplotlib = pytest.importorskip("matplotlib")  # only tools/plot.py needs it (requirements.txt)


def _decoded(path) -> np.ndarray:
    import matplotlib.image
    return matplotlib.image.imread(path)


@pytest.fixture
def logs(tmp_path):
    """One config's logs from each trainer, line for line as shared/runlog.py prints them (real tiny runs of
    both trainers take ~100 s on the CI box; README's demo plot is made from real ones)."""
    return {"mlx": str(write_log(tmp_path / "mlx.txt", 30.0, steps=6, val_every=3, backend="mlx-0.29.1 device:cpu")),
            "cuda": str(write_log(tmp_path / "cuda.txt", 12.0, steps=6, val_every=3, artifact_bytes=61_234))}


def test_both_trainers_plot_and_tabulate(logs, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert main([logs["mlx"], logs["cuda"], "--out", str(png)]) == 0
    image = _decoded(png)
    assert image.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))
    assert image[..., :3].std() > 0.05  # curves drawn, not a blank canvas
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["run", "trainer", "final_bpb", "steps", "ms/step", "artifact_bytes"]
    assert rows[1].split() == ["mlx", "mlx-0.29.1", "1.8000", "6", "5000.0", "60,000"]
    assert rows[2].split() == ["cuda", "torch-2.13.0", "1.8000", "6", "2000.0", "61,234"]
    for path in logs.values():
        run = parse_run(path)
        assert [s for s, *_ in run.train] == list(range(1, 7)) and [s for s, *_ in run.val] == [0, 3, 6]


def test_an_unfinished_run_is_plotted_with_dashes(tmp_path, capsys):
    done = write_log(tmp_path / "done.txt", 50.0, backend="mlx-0.29.1 device:cpu")
    cut = write_log(tmp_path / "cut.txt", 50.0, steps=20, finished=False)
    png = tmp_path / "p.png"
    assert main([str(done), str(cut), "--out", str(png)]) == 0 and _decoded(png).size
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["done", "mlx-0.29.1"] and out[1].split()[2] == "1.8000"
    assert out[2].split() == ["cut", "torch-2.13.0", "-", "20", "2500.0", "-"]


def test_a_file_that_is_not_a_run_log_is_a_one_line_error(tmp_path, capsys):
    other = tmp_path / "notes.txt"
    other.write_text("step 1: bought milk\n")
    png = tmp_path / "p.png"
    assert main([str(other), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(other) in err and "not a run log" in err
    assert not png.exists()
