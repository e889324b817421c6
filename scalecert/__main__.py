"""Command line: python -m scalecert {train,recalibrate,remeasure,certify,bench,audit,data,models,cache,ablation}."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = ("train", "recalibrate", "remeasure", "certify", "bench", "audit", "data", "models", "cache", "ablation")
    usage = f"usage: python -m scalecert {{{','.join(cmds)}}} [options]  (-h after a command for help)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in cmds:  # one line on stderr, as every command's argument errors (cli.Parser)
        what = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"error: {what}; {usage}", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .train import main as run
    elif cmd == "recalibrate":
        from .train import recalibrate_main as run
    elif cmd == "remeasure":
        from .train import remeasure_main as run
    else:
        from . import cli

        run = getattr(cli, cmd)
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
