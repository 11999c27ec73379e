"""What the harnesses share: `tasks` (dataset readers and task loaders), `metrics` (slot F1, exact match, BLEU,
chrF), `machine` (the machine description, shared-CPU check) and `report` (the JSON + markdown writer)."""
