"""The command-line tools' argument parser: a user error is one line on stderr and exit 2 (argparse's own
error prints the whole usage block first, which buries the message)."""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
