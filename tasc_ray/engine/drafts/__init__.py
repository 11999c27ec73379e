"""Where drafts come from: the task's n-gram index, the row's own tokens and the live overlay of finished outputs,
combined by calibrated acceptance into one token tree per row (a chain is a tree with one branch)."""
