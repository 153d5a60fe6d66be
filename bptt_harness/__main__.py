from bptt_harness.cli import entry

raise SystemExit(entry())
