"""The support-desk demo: the simulated model and the scenario `loopwise demo` runs."""
