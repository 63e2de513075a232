"""The rules a run is held to, as data: limits, budgets (local and shared), prices, token estimates, the context policy (REFINE), runaway detection (CHECK), redaction."""
