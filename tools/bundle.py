"""Bundle cuda_train.py and every module it ships with into one self-contained train_gpt.py.

    python -m tools.bundle --out records/.../train_gpt.py [--compress]

A challenge entry must hold all counted code in one script that runs from its
records folder. The bundle carries each shipped module's source as a string
(the list is shared/shipped.py's: the shared package and its subpackages, and
the trainer's top-level modules such as torch_model) and serves those imports
from them (a meta-path finder), then runs cuda_train.py's source as __main__:
no import rewriting, the code that runs is the code that was tested. --compress
wraps it as lzma+base85 text that decompresses itself . The same sources always give the same bytes, so a log's
recorded source can be compared with what ships.
"""
from __future__ import annotations

import argparse
import importlib.util
import lzma
import sys
from pathlib import Path

from shared.fsutil import atomic_write_bytes
from shared.shipped import TRAINER_NAME, package_names, repo_root, shipped_modules
from tools.minify import minify_modules, minify_source

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


# codec -> (module the wrapper imports, compress); each decompresses with `module.decompress(data)`.
CODECS = {
    "brotli": ("brotli", lambda data: __import__("brotli").compress(data, quality=11, lgwin=24)),
    "lzma": ("lzma", lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    "zstd": ("zstandard", lambda data: __import__("zstandard").ZstdCompressor(level=22).compress(data)),
}
CODEC_CHOICES = ("best",) + tuple(CODECS)
# In a Python string literal these bytes need an escape: the closing quote, the escape character itself, and
# the line ends and NUL that the tokenizer would not keep as they are.
_ESCAPES = {ord('"'): b'\\"', ord("\\"): b"\\\\", ord("\n"): b"\\n", ord("\r"): b"\\r"}


def _plain_source(trainer: Path, root: Path | None, minify: bool) -> str:
    sources, packages, main = module_sources(trainer, root)
    if minify:
        small = minify_modules({**sources, "__main__": main})
        main = small.pop("__main__")
        sources = {name: small[name] for name in sources}
    lines = ['"""train_gpt.py: cuda_train.py with every module it ships with, in one file (tools/bundle.py)."""',
             "import importlib.abc", "import importlib.util", "import sys", "",
             "_SOURCES = {"]
    lines += [f"    {name!r}: {src!r}," for name, src in sources.items()]
    lines += ["}", f"_PACKAGES = {tuple(packages)!r}", f"_MAIN = {main!r}", _LOADER]
    text = "\n".join(lines)
    return minify_source(text) if minify else text


def latin1_literal(data: bytes) -> bytes:
    """data as the body of a "..." literal in a latin-1 source file: one byte per byte but for a few escapes."""
    out = bytearray()
    for i, b in enumerate(data):
        if b == 0:  # "\0" unless an octal digit follows, which would extend the escape
            out += b"\\x00" if data[i + 1:i + 2].isdigit() else b"\\0"
        else:
            out += _ESCAPES.get(b, bytes((b,)))
    return bytes(out)


def available_codecs() -> list[str]:
    return [name for name, (module, _) in CODECS.items() if importlib.util.find_spec(module) is not None]


def self_extracting(text: str, codec: str = "best") -> bytes:
    """A latin-1 script that decompresses text with codec (the smallest available one for "best") and runs it."""
    if codec not in CODEC_CHOICES:
        raise ValueError(f"codec {codec!r}: expected one of {CODEC_CHOICES}")
    data = text.encode("utf-8")
    names = available_codecs() if codec == "best" else [codec]
    packed = {name: CODECS[name][1](data) for name in names}
    name = min(names, key=lambda n: (len(packed[n]), n))  # ties go to the first name: the same bytes every time
    module = CODECS[name][0]
    return (b"#coding:latin-1\nimport " + module.encode() + b'\nexec(compile(' + module.encode()
            + b'.decompress("' + latin1_literal(packed[name]) + b'".encode("latin-1")),__file__,"exec"))\n')


def bundle_bytes(trainer: Path = TRAINER, compress: bool = False, root: Path | None = None,
                 codec: str = "best") -> bytes:
    """The train_gpt.py that ships: readable sources as they are, or (compress) the minified, self-extracting one."""
    if not compress:
        return _plain_source(trainer, root, minify=False).encode("utf-8")
    return self_extracting(_plain_source(trainer, root, minify=True), codec)


def bundle_source(trainer: Path = TRAINER, compress: bool = False, root: Path | None = None,
                  codec: str = "best") -> str:
    """bundle_bytes as text (latin-1 for the compressed one, one character per byte)."""
    data = bundle_bytes(trainer, compress, root, codec)
    return data.decode("latin-1" if compress else "utf-8")


def write_bundle(out: str | Path, trainer: Path = TRAINER, compress: bool = False, root: Path | None = None,
                 codec: str = "best") -> int:
    """Write the bundle atomically; returns its size in bytes (its code bytes)."""
    data = bundle_bytes(trainer, compress, root, codec)
    atomic_write_bytes(out, data)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="where to write train_gpt.py")
    ap.add_argument("--size", action="store_true", help="print the --compress bundle's bytes and write nothing")
    ap.add_argument("--trainer", default=str(TRAINER), help=argparse.SUPPRESS)
    ap.add_argument("--compress", action="store_true", help="minified, compressed, self-extracting script")
    ap.add_argument("--codec", choices=CODEC_CHOICES, default="best", help="the compressor of --compress")
    args = ap.parse_args(argv)
    if args.size:
        print(len(bundle_bytes(Path(args.trainer), compress=True, codec=args.codec)))
        return 0
    if not args.out:
        ap.error("--out is required (or --size)")
    n = write_bundle(args.out, compress=args.compress, codec=args.codec)
    print(f"bundle:{args.out} code_bytes:{n} compressed:{int(args.compress)}"
          + (f" uncompressed_bytes:{len(bundle_bytes())}" if args.compress else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
