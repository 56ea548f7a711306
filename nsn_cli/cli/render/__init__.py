"""Rich output for the commands: progress bars, tables and banners (no computation)."""
