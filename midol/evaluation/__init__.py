"""midol eval: frozen-backbone evaluation (metrics, protocols, suites, reports)."""
