"""virtfleet shared language: config, store, message contract and small helpers."""
