"""Reports: terminal tables, markdown, plots."""
