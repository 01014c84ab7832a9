"""The command lines: `common.py` holds what every command shares (errors and exit codes, the
generation flags, input, progress bars); `run.py` is `gpt-run`. The other commands live beside
their front doors (`serve/cli.py`, `ray/cli.py`, `explain/cli.py`) and the converter's."""
