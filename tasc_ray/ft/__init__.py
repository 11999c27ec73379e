"""TASC-ft: vocabulary enrichment (new tokens from frequent output n-grams) and the fine-tuning loop."""
