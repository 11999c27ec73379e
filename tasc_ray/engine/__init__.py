"""TASC-spec, the engine: batched, lossless speculative decoding with drafts from the task's own outputs.

The listing is the design: `generator` (the offline API) hands requests to a `scheduler` (owns the batch), which
steps `proposer` (what each row drafts, from `drafts/`), `runner` (the model's forward over cache slots, on
`model/`), `verify` (the acceptance rule) and `outputs` (stops, results); `loop` runs a scheduler on a decode thread
for Serve and labeling; `config` holds every setting; `load` builds it all from an EngineConfig; `simulate` replays
outputs through a drafter without a model. See docs/engine.md.

Never imports Ray: everything here runs in a plain Python process, and Ray stages and Serve replicas call it.
"""
