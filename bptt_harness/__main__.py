from bptt_harness.cli import main

raise SystemExit(main())
