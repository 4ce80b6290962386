"""The `conceptkit` sub-commands, one module each: `register(sub)` adds its options (beside the code that reads
them), `run(args)` (or `run_<sub-command>`) does the work. cli.py only dispatches."""
