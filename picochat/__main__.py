"""`python -m picochat <command>` is the same as `picochat <command>`."""

from picochat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
