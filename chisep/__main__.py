from chisep.cli import main

raise SystemExit(main())
