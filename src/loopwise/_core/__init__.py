"""The loop's rules, pure: no I/O, no clock, no threads, no event loop, no store.

```
            events (logged)                           inputs (what happened)
  fold ─────────────────────┐                ┌───────────────────────────────
                            ▼                ▼
                   evolve(state, event)   decide(state, input) ──► events + a command
                            ▲                                         │
                            └──────── the driver stamps and emits ◄───┘
```

- `state`: what a run holds (transcript, context and runaway state, counters, what is
  in flight).
- `evolve`: how each event changes that state; the one place it changes. The live
  driver (`_runtime.run.Run`) passes every event it emits through it, and resume folds the
  logged events through it (`fold`), so both hold the same state by construction.
- `decide`: the THINK/ACT/OBSERVE/REFINE/CHECK rules: from the state and an input, the
  events the rule itself produces (an iteration starts, a nudge, a limit hit, tool calls
  not executed at the cap) and what the driver does next (`CallModel`, `RunTools`,
  `Stop`). Time is an input; the core never reads a clock.
- `refine`: REFINE's outcome of one fold (summarized or dropped), for its event.

The driver is `_runtime.run.Run` (asyncio/anyio: the model call under its policy and reservation,
tool calls under theirs, writes, the kill and deadline scope); resume is `fold` plus
that driver (`_runtime.resume.settle` says how what was in flight is settled).
"""
