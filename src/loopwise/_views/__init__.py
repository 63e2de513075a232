"""Views over the event log: `RunResult`, `show` (and what each model call was shown), the decision log, the profile, JSON and OTLP export, `logging` records."""
