"""Each pipeline stage with its config: convert, finetune, profile, frontier, export."""
