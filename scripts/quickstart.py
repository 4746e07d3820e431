"""BitNet a4.8 in miniature: full precision, b1.58 and a4.8 (two stages) on the embedded corpus, about 12 minutes
on a 2-core CPU. Same as ``bitnet-a48 quickstart``; every option of that command is accepted (``--help``)."""

from __future__ import annotations

import sys

from bitnet_a48.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["quickstart", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
