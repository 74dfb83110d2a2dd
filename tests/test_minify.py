"""tools/minify.py and the compressed bundle's wrapper: smaller sources that behave the same, bytes that survive
the latin-1 literal, and a compressed train_gpt.py that trains and scores like cuda_train.py."""
import ast
import subprocess
import sys

from conftest import ROOT, run_script, tiny_env
from shared.runlog import parse_final
from tools.bundle import CODECS, available_codecs, bundle_bytes, latin1_literal, module_sources, self_extracting
from tools.minify import minify_modules

# Each function below has a trap for a careless renamer: a closure over a local, a comprehension variable that
# shadows a global read elsewhere in the function, global/nonlocal bindings, an f-string's `=` form, `except as`,
# a keyword argument, locals(), and a function only reached through a string (getattr).
SAMPLE = '''
"""module docstring"""
import math
item = 100  # a global that a comprehension variable shadows


def closure(values: list[int]) -> int:
    """docstring"""
    total = 0
    def add(x):
        nonlocal total
        total += x
    for value in values:
        add(value)
    return total


def shadow(values):
    squares = [item * item for item in values]  # this `item` is the comprehension's own
    return squares, item  # this one is the global


def counter():
    global item
    previous = item
    item = previous + 1
    return previous


def fstring(width):
    height = width * 2
    try:
        raise ValueError("boom")
    except ValueError as error:
        message = f"{height=} {error!s}"
    return message


def keyword(alpha, *, beta=2):
    return alpha - beta


def introspect(a):
    bb = a + 1
    return sorted(locals())


def by_name():
    return "reached"


def unused_helper():
    return 1


def run():
    return [closure([1, 2, 3]), shadow([2, 3]), counter(), item, fstring(4), keyword(beta=1, alpha=5),
            introspect(1), getattr(sys.modules[__name__], "by_name")(), math.floor(2.5)]


ENTRY = run  # the test calls run(): a top-level function that nothing names would be dropped
'''


def _run(source: str) -> list:
    mod = type(sys)("sample")
    sys.modules["sample"] = mod
    try:
        exec(compile("import sys\n" + source, "sample", "exec"), mod.__dict__)
        return mod.run()
    finally:
        del sys.modules["sample"]


def test_minified_code_behaves_the_same_and_drops_comments_docstrings_and_unused_definitions():
    small = minify_modules({"sample": SAMPLE})["sample"]
    assert _run(small) == _run(SAMPLE)
    assert "docstring" not in small and "#" not in small and "unused_helper" not in small
    assert "by_name" in small and "list[int]" not in small
    assert "squares" not in small and "previous" not in small  # locals renamed ...
    assert "nonlocal total" in small and "global item" in small and "bb = a + 1" in small  # ... but not these
    assert len(small) < len(SAMPLE) * 0.8


def test_class_annotations_stay_for_dataclasses():
    src = "from dataclasses import dataclass\n@dataclass\nclass C:\n    x: int = 1\n    y: float = 2.0\n" \
          "def run():\n    return C(y=3.0)\nENTRY = run\n"
    small = minify_modules({"m": src})["m"]
    assert "x: int = 1" in small and "y: float" in small


def test_shipped_modules_minify_deterministically_and_keep_every_imported_name():
    sources, _, main = module_sources()
    sources = {**sources, "__main__": main}
    small = minify_modules(sources)
    assert small == minify_modules(sources)
    for name, src in small.items():
        tree = ast.parse(src)  # compiles
        for node in ast.walk(ast.parse(sources[name])):
            if isinstance(node, ast.ImportFrom) and node.module and node.module in sources:
                target = ast.parse(small[node.module])
                defined = {getattr(s, "name", None) for s in target.body} | {
                    t.id for s in ast.walk(target) if isinstance(s, ast.Name) for t in [s]}
                for alias in node.names:  # what one module imports from another is still there
                    assert alias.name in defined or f"{node.module}.{alias.name}" in sources, \
                        f"{name} imports {alias.name} from {node.module}: dropped"
        assert tree.body or not src.strip()


def test_latin1_literal_round_trips_every_byte(tmp_path):
    data = bytes(range(256)) + b"\x001\x008\x00\x00a\\\"\r\n\"" + bytes(range(255, -1, -1))
    script = tmp_path / "t.py"
    script.write_bytes(b"#coding:latin-1\nimport sys\nsys.stdout.buffer.write(\"" + latin1_literal(data)
                       + b"\".encode(\"latin-1\"))\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data


def test_every_codec_self_extracts(tmp_path):
    for codec in available_codecs():
        script = tmp_path / f"{codec}.py"
        script.write_bytes(self_extracting("import sys\nprint(__name__, len(sys.argv))\n", codec))
        res = subprocess.run([sys.executable, "-I", str(script), "x"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout == "__main__ 2\n", (codec, res.stderr)
    assert set(available_codecs()) <= set(CODECS)


def test_compressed_bundle_trains_and_scores_like_cuda_train(tiny_data, tmp_path):
    """The shipped, minified train_gpt.py and the repo's cuda_train.py: the same run, the same final line."""
    bundle = bundle_bytes(compress=True)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "train_gpt.py").write_bytes(bundle)
    finals, logs = [], []
    for cwd, script in ((tmp_path, [str(ROOT / "cuda_train.py")]), (alone, ["-I", str(alone / "train_gpt.py")])):
        env = tiny_env(tiny_data, cwd, ITERATIONS=2, WARMUP_STEPS=0, RUN_ID="same")
        out = run_script(script, env, cwd).stdout
        finals.append(parse_final(out))
        logs.append(out)
    assert finals[0] == finals[1], finals
    for out in logs:  # both count the bytes that ship: the compressed bundle
        assert f"code_bytes:{len(bundle)} " in out, out[-800:]
