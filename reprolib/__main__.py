from reprolib.cli import entry

raise SystemExit(entry())
