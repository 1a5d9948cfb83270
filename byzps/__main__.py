"""`python -m byzps`: the `byzps` command, for environments without the console script on PATH.

The rest of the `byzps` namespace lives in the top-level folders (pyproject.toml maps them); this
folder holds only this entry point.
"""

from byzps.cli.main import main

if __name__ == "__main__":
    main(prog_name="byzps")
