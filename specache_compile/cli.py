"""The ``specache`` command: ``demo``, ``eval`` and ``bench``.

Bad input ends in one line on stderr (what was expected, what was given, the fix) and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap

import torch

_DESCRIPTION = """\
specache keeps a model's KV cache in host memory and a low-bit copy on the
GPU, and fetches only the tokens that matter at each step: a torch.compile
backend, applied with specache.compile(model).
"""

_EXAMPLES = """\
examples:
  specache demo                          SmolLM2-135M if installed, else the
                                         shipped tiny model
  specache demo --context 4096 --policy kcache
  specache eval --quick                  a small accuracy grid on CPU (~2 min)
  specache bench decode --tiny --contexts 256 512
                                         the decode benchmark's CPU smoke run
"""


class UsageError(Exception):
    """Bad command-line input: the message is the one line printed (expected, got, fix)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage too: two lines and a wall of flags
        raise UsageError(f"{self.prog}: {_expected_got(message)}" + (
            "" if "fix:" in message else f"; fix: see `{self.prog} --help`"))


def _expected_got(message: str) -> str:
    """argparse's own messages, reworded as expected / got."""
    if m := re.fullmatch(r"argument (\S+): invalid choice: (.+) \(choose from (.+)\)", message):
        return f"argument {m[1]}: expected one of {m[3]}, got {m[2]}"
    if m := re.fullmatch(r"the following arguments are required: (.+)", message):
        return f"expected {m[1]}, got none"
    if m := re.fullmatch(r"unrecognized arguments: (.+)", message):
        return f"expected the flags its help lists, got {m[1]}"
    if m := re.fullmatch(r"argument (\S+): invalid (\w+) value: (.+)", message):
        return f"argument {m[1]}: expected a{'n' if m[2][0] in 'aeiou' else ''} {m[2]}, got {m[3]}"
    if m := re.fullmatch(r"argument (\S+): expected one argument", message):
        return f"argument {m[1]}: expected a value after it, got none"
    return message


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, each flag's default after its help, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, True, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _positive(what: str, fix: str):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n <= 0 or str(n) != value.strip():
            raise argparse.ArgumentTypeError(f"expected {what} (an integer > 0), got {value!r}; fix: {fix}")
        return n

    return parse


def _policy(value: str) -> str:
    import specache

    names = specache.policies()
    if value not in names:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, got {value!r}; fix: --policy specache "
                                         "(the default), or another name of that list")
    return value


def _device(value: str) -> str:
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}; fix: --device cpu")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "no CUDA build" if torch.version.cuda is None else "no GPU visible"
            raise argparse.ArgumentTypeError(
                f"expected a CUDA device, got {value!r} on a machine where torch {torch.__version__} sees none ({why})"
                "; fix: --device cpu (the default here)")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"expected cuda:0 .. cuda:{count - 1}, got {value!r}; fix: --device cuda")
    return value


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="one question about a long document, answered with the full KV cache and "
                       "with specache, side by side",
                       description=textwrap.fill(
                           "One question about a long document (a ship's log with one fact hidden in it), answered by "
                           "the same model with its full KV cache and compiled by specache: the KV bytes on the "
                           "device, whether the answers' tokens are equal, both answers, and each run's time.", 78),
                       formatter_class=_Help)
    d.add_argument("--model", default=None, metavar="NAME|FOLDER",
                   help="smollm2-135m, gemma3-270m (python3 -m specache_compile.models fetch NAME), tiny (the shipped "
                        "models/specache-tiny) or a transformers model folder (default: smollm2-135m if installed, "
                        "else tiny)")
    d.add_argument("--policy", default="specache", type=_policy,
                   help="the KV-cache policy specache runs (specache.policies() lists them)")
    d.add_argument("--topk", type=_positive("a row count", "--topk 64"), default=None,
                   help="full-precision rows fetched per KV head per step (default: the policy's, 64 for specache)")
    d.add_argument("--context", type=_positive("a token count", "--context 2048"), default=2048,
                   help="tokens of the document the question is about")
    d.add_argument("--new-tokens", type=_positive("a token count", "--new-tokens 16"), default=16,
                   help="tokens each run may answer with (it stops earlier at the model's end of turn)")
    d.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs: cpu, cuda or cuda:N")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (and its KV cache's)")
    d.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the full-cache run (specache's column alone)")


def _parser() -> _Parser:
    from . import __version__
    from .bench_cli import BENCHES

    parser = _Parser(prog="specache", description=_DESCRIPTION, epilog=_EXAMPLES, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"specache {__version__} (torch {torch.__version__})",
                        help="print specache's version (and torch's) and exit")
    sub = parser.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND",
                                parser_class=_Parser)
    _demo_parser(sub)
    sub.add_parser("eval", help="the accuracy harness: needle, passkey, RULER tasks, agreement with the full cache",
                   add_help=False)
    b = sub.add_parser("bench", help="the benchmarks of bench/: decode, kernels, memory", formatter_class=_Help,
                       description=textwrap.fill(
                           "The benchmark scripts of bench/, run in this process with a progress bar; their flags, "
                           "rows (bench/results/) and plots are the scripts' own: specache bench decode --help.", 78))
    bench = b.add_subparsers(dest="bench", required=True, title="benchmarks", metavar="BENCHMARK",
                             parser_class=_Parser)
    for name, spec in BENCHES.items():
        bench.add_parser(name, help=spec.about, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    from .demo import DemoError

    parser = _parser()
    # eval and bench hand everything after their name to the harness / script, which parse it themselves
    if argv[:1] == ["eval"]:
        from .evals.harness import main as eval_main

        return _one_line("specache eval", eval_main, argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and not argv[1].startswith("-"):
        from . import bench_cli

        if argv[1] not in bench_cli.BENCHES:
            parser.parse_args(argv[:2])  # the error: an unknown benchmark, with the ones there are
        return _one_line(f"specache bench {argv[1]}", bench_cli.run, argv[1], argv[2:])
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from . import demo

        try:
            return demo.run(args)
        except DemoError as e:
            raise UsageError(f"specache demo: {e}") from None
    raise UsageError(f"specache: expected a command, got {argv!r}; fix: specache --help")


def _one_line(prog: str, fn, *args) -> int:
    """``fn(*args)``, with specache's own refusals of bad input (a ValueError saying expected / got / fix) turned into
    the one-line error, and so are the argparse errors of the parser ``fn`` builds (the harness', a bench script's:
    argparse's own ``error`` would print the usage too); anything else propagates with its traceback."""

    def error(parser, message):
        raise UsageError(f"{prog}: {_expected_got(message)}" + (
            "" if "fix:" in message else f"; fix: see `{prog} --help`"))

    own = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error  # for this call only: restored below
    try:
        return fn(*args)
    except ValueError as e:
        msg = str(e)
        if not msg.startswith("specache") or "expected" not in msg:
            raise
        raise UsageError(msg.splitlines()[0] if msg.startswith(prog) else f"{prog}: {msg.splitlines()[0]}") from None
    finally:
        argparse.ArgumentParser.error = own


if __name__ == "__main__":
    sys.exit(main())
