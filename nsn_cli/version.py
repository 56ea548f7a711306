"""The package version, apart from the package root so no module inside imports the root."""

__version__ = "0.1.0"
