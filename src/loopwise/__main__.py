"""`python -m loopwise`: the command line."""

from loopwise.cli import run_main

if __name__ == "__main__":
    run_main()
