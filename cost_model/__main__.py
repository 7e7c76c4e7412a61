"""``python -m cost_model`` entry point."""
from .cli import main

raise SystemExit(main())
