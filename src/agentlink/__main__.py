from agentlink.cli import main

raise SystemExit(main())
