"""Static HTML reports: `conceptkit demo` (the showcase) and `conceptkit report` (pages from `evaluate --json` files)."""
