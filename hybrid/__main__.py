"""`python -m hybrid` is `hybrid-run`."""

from hybrid.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
