"""The interface: the Typer app, recipes and their runner, and every Rich table."""
