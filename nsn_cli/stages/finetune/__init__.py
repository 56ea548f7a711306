"""`nsn finetune`: joint multi-rank training (trainer, set-up, objective, logs, processes)."""
