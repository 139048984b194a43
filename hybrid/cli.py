"""hybrid-run: the command line entry point."""

import sys

from hybrid import __version__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv:
        print(f"hybrid-run {__version__}")
        return 0
    if "--dry-run" in argv:
        from placement.cli import main as dry_run_main

        return dry_run_main([a for a in argv if a != "--dry-run"])
    print("usage: hybrid-run MODEL.gguf [--dry-run] [--version]")
    return 0 if "--help" in argv or "-h" in argv else 2


if __name__ == "__main__":
    sys.exit(main())
