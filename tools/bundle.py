"""Bundle cuda_train.py and every module it ships with into one self-contained train_gpt.py.

    python -m tools.bundle --out records/.../train_gpt.py [--compress]

A challenge entry must hold all counted code in one script that runs from its
records folder. The bundle carries each shipped module's source as a string
(the list is shared/shipped.py's: the shared package and its subpackages, and
the trainer's top-level modules such as torch_model) and serves those imports
from them (a meta-path finder), then runs cuda_train.py's source as __main__:
no import rewriting, the code that runs is the code that was tested. --compress
wraps it as lzma+base85 text that decompresses itself (the leaderboard's way to
cut code bytes). The same sources always give the same bytes, so a log's
recorded source can be compared with what ships.
"""
from __future__ import annotations

import argparse
import base64
import lzma
import sys
from pathlib import Path

from shared.fsutil import atomic_write_text
from shared.shipped import TRAINER_NAME, package_names, repo_root, shipped_modules

TRAINER = repo_root() / TRAINER_NAME

_LOADER = '''
class _BundledModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the shipped modules from _SOURCES, so nothing is imported from disk."""

    def find_spec(self, name, path=None, target=None):
        if name in _SOURCES:
            return importlib.util.spec_from_loader(name, self, is_package=name in _PACKAGES)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__dict__["__bundled__"] = True
        exec(compile(_SOURCES[module.__name__], "<bundled " + module.__name__ + ">", "exec"), module.__dict__)


sys.meta_path.insert(0, _BundledModules())
exec(compile(_MAIN, __file__, "exec"), {"__name__": __name__, "__file__": __file__, "__builtins__": __builtins__})
'''


def module_sources(trainer: Path = TRAINER, root: Path | None = None) -> tuple[dict[str, str], list[str], str]:
    """(module name -> source, package names, trainer source). A package folder without
    an __init__.py is served as an empty package, as Python would import it from disk."""
    files = shipped_modules(root)
    packages = package_names(files)
    sources = {name: path.read_text(encoding="utf-8") for name, path in files.items()}
    sources.update({name: "" for name in packages if name not in sources})
    return dict(sorted(sources.items())), packages, Path(trainer).read_text(encoding="utf-8")


def bundle_source(trainer: Path = TRAINER, compress: bool = False, root: Path | None = None) -> str:
    sources, packages, main = module_sources(trainer, root)
    lines = ['"""train_gpt.py: cuda_train.py with every module it ships with, in one file (tools/bundle.py)."""',
             "import importlib.abc", "import importlib.util", "import sys", "",
             "_SOURCES = {"]
    lines += [f"    {name!r}: {src!r}," for name, src in sources.items()]
    lines += ["}", f"_PACKAGES = {tuple(packages)!r}", f"_MAIN = {main!r}", _LOADER]
    text = "\n".join(lines)
    if not compress:
        return text
    blob = base64.b85encode(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    return f'import lzma,base64;exec(compile(lzma.decompress(base64.b85decode("{blob}")),__file__,"exec"))\n'


def write_bundle(out: str | Path, trainer: Path = TRAINER, compress: bool = False, root: Path | None = None) -> int:
    """Write the bundle atomically; returns its size in UTF-8 bytes (its code bytes)."""
    text = bundle_source(trainer, compress, root)
    atomic_write_text(out, text)
    return len(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compress", action="store_true", help="self-extracting lzma+base85 script")
    args = ap.parse_args(argv)
    n = write_bundle(args.out, compress=args.compress)
    print(f"bundle:{args.out} code_bytes:{n} compressed:{int(args.compress)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
