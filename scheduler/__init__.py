"""The scheduler: pure placement, claims in the store, event handling and host liveness."""
