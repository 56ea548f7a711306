"""The on-disk contract: manifest, atomic writes, directory swaps, lock, integrity,
path safety, checkpoints, loading a project and reading data."""
