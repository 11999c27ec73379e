"""The `tasc-ray` command line: `main.py` builds the parser and runs a command; each other module registers one
feature's subcommands; `args.py` turns the config models into flags."""
