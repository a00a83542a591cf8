"""REST API blueprints, one per resource, under /api/v1."""
