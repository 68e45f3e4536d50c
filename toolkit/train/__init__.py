"""Training: `python -m toolkit.train` (see toolkit/train/cli.py for the commands)."""


def main(argv: list[str] | None = None) -> int:
    from toolkit.train.cli import main as cli_main

    return cli_main(argv)
