"""``python -m openpanel_async``: the same as the ``openpanel-async`` command."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
