"""`python -m vgen ...` (also what `torchrun -m vgen` launches)."""

from vgen.cli import main

if __name__ == "__main__":
    main()
