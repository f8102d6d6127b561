from edgeface.cli import main

raise SystemExit(main())
