"""Ray stages: the corpus index job (Ray Data), batch labeling (Ray Data), fine-tuning (Ray Train), Ray start-up."""
