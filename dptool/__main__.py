"""`python -m dptool` runs the CLI (also under `torchrun -m dptool`)."""

from dptool.cli.main import main

if __name__ == "__main__":
    main()
